#pragma once
#include "emu_half.h"
