// Host stand-ins for CUDA's __half and __nv_bfloat16: 16-bit storage, f32 arithmetic, round to
// nearest even on conversion (what __float2half_rn / __float2bfloat16_rn do on the device).
#pragma once
#include <stdint.h>
#include <string.h>

struct __half {
    uint16_t bits;
};
struct __nv_bfloat16 {
    uint16_t bits;
};

inline uint32_t emu_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
inline float emu_bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

inline float __bfloat162float(__nv_bfloat16 h) { return emu_bits_f32((uint32_t)h.bits << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u = emu_f32_bits(f);
    __nv_bfloat16 h;
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
        h.bits = (uint16_t)((u >> 16) | 0x40);
        return h;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    h.bits = (uint16_t)(u >> 16);
    return h;
}

inline float __half2float(__half h) {
    const uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16;
    uint32_t exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
    if (exp == 0x1f) return emu_bits_f32(sign | 0x7f800000u | (man << 13));  // inf / NaN
    if (exp == 0) {
        if (man == 0) return emu_bits_f32(sign);
        // Subnormal: normalise.
        int e = -1;
        do {
            man <<= 1;
            ++e;
        } while ((man & 0x400u) == 0);
        return emu_bits_f32(sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13));
    }
    return emu_bits_f32(sign | ((exp + 127 - 15) << 23) | (man << 13));
}

inline __half __float2half_rn(float f) {
    const uint32_t u = emu_f32_bits(f);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t abs = u & 0x7fffffffu;
    __half h;
    if (abs > 0x7f800000u) {
        h.bits = sign | 0x7e00u;
        return h;
    }
    if (abs >= 0x477ff000u) {  // rounds to >= 65520: infinity
        h.bits = sign | 0x7c00u;
        return h;
    }
    if (abs < 0x38800000u) {  // below the smallest normal half: subnormal or zero
        const float a = emu_bits_f32(abs);
        // Scale so one half-subnormal ulp (2^-24) is 1.0; rint rounds to nearest even.
        const float scaled = a * 16777216.0f;
        const uint32_t m = (uint32_t)__builtin_rintf(scaled);
        h.bits = sign | (uint16_t)m;
        return h;
    }
    uint32_t exp = (abs >> 23) - 127 + 15, man = abs & 0x7fffffu;
    uint32_t r = (exp << 10) | (man >> 13);
    const uint32_t rest = man & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (r & 1u))) ++r;
    h.bits = sign | (uint16_t)r;
    return h;
}
