//! Build script: compiles every `kernels/*.cu` into a fatbin (sm_90 machine code + compute_80 PTX)
//! and embeds the result in the crate.
//!
//! nvcc is looked up in this order: `$NVCC`, `nvcc` on `PATH`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin`,
//! then the repository's `.cuda-tools/nvidia/cu13/bin/nvcc` (the pinned PyPI wheels, see
//! docs/gpu.md). Without nvcc — or with `ELDER_SKIP_CUDA=1` — the crate builds CPU-only and says so in
//! exactly one `cargo:warning`; it never fails for lack of CUDA. When nvcc exists, a kernel that does
//! not compile FAILS the build so CI catches it.
//!
//! Output: `$OUT_DIR/cuda_kernels.rs` defining `KERNEL_FATBINS: &[(&str, &[u8])]` (file stem, fatbin
//! bytes), and `cfg(elder_cuda_kernels)` when the kernels were compiled. The ptxas register/spill
//! report of each file lands in `$OUT_DIR/<stem>.ptxas.log`.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const KERNEL_DIR: &str = "kernels";
const WHEEL_NVCC: &str = ".cuda-tools/nvidia/cu13/bin/nvcc";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={KERNEL_DIR}");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "PATH", "ELDER_SKIP_CUDA"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo::rustc-check-cfg=cfg(elder_cuda_kernels)");

    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest_dir =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let sources = kernel_sources(&manifest_dir.join(KERNEL_DIR));
    for path in kernel_files_and_headers(&manifest_dir.join(KERNEL_DIR)) {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let skip_reason = if env::var("ELDER_SKIP_CUDA").is_ok_and(|v| v == "1") {
        Some("ELDER_SKIP_CUDA=1 is set".to_string())
    } else if sources.is_empty() {
        Some(format!("no .cu files in {KERNEL_DIR}/"))
    } else {
        None
    };
    let nvcc = match skip_reason {
        Some(reason) => Err(reason),
        None => find_nvcc(&manifest_dir).ok_or_else(|| {
            "nvcc not found (looked at $NVCC, PATH, $CUDA_HOME/bin, $CUDA_PATH/bin, .cuda-tools/)".to_string()
        }),
    };
    let nvcc = match nvcc {
        Ok(nvcc) => nvcc,
        Err(reason) => {
            println!("cargo:warning=elder: CUDA kernels were not compiled ({reason}); building the CPU-only engine");
            write_embed_file(&out_dir, &[]);
            return;
        }
    };

    // One nvcc process per file, two at a time (the build machines have 2 cores).
    let mut built = Vec::new();
    let mut failures = Vec::new();
    for chunk in sources.chunks(2) {
        let handles: Vec<_> = chunk
            .iter()
            .map(|src| {
                let (nvcc, src, out_dir, inc) = (
                    nvcc.clone(),
                    src.clone(),
                    out_dir.clone(),
                    manifest_dir.join(KERNEL_DIR),
                );
                std::thread::spawn(move || compile_one(&nvcc, &src, &out_dir, &inc))
            })
            .collect();
        for h in handles {
            match h.join().expect("nvcc worker thread panicked") {
                Ok(entry) => built.push(entry),
                Err(msg) => failures.push(msg),
            }
        }
    }
    if !failures.is_empty() {
        eprintln!("{}", failures.join("\n\n"));
        panic!(
            "elder: {} CUDA kernel file(s) failed to compile with {}",
            failures.len(),
            nvcc.display()
        );
    }
    write_embed_file(&out_dir, &built);
    println!("cargo:rustc-cfg=elder_cuda_kernels");
}

/// `kernels/*.cu`, sorted so the embedded table is deterministic.
fn kernel_sources(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = kernel_files_and_headers(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    v.sort();
    v
}

fn kernel_files_and_headers(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu" || e == "cuh"))
        .collect();
    v.sort();
    v
}

fn is_executable_file(p: &Path) -> bool {
    p.is_file()
}

fn find_nvcc(manifest_dir: &Path) -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC").map(PathBuf::from) {
        if is_executable_file(&p) {
            return Some(p);
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join("nvcc");
            if is_executable_file(&p) {
                return Some(p);
            }
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var) {
            let p = Path::new(&root).join("bin").join("nvcc");
            if is_executable_file(&p) {
                return Some(p);
            }
        }
    }
    let p = manifest_dir.join(WHEEL_NVCC);
    is_executable_file(&p).then_some(p)
}

/// Compiles one `.cu` file; returns (stem, fatbin path) or the compiler's message.
fn compile_one(
    nvcc: &Path,
    src: &Path,
    out_dir: &Path,
    include: &Path,
) -> Result<(String, PathBuf), String> {
    let stem = src
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("kernel")
        .to_string();
    let fatbin = out_dir.join(format!("{stem}.fatbin"));
    // No --use_fast_math: the kernels are checked against the CPU at 1e-5 in f32 and the softmax /
    // norm paths need accurate expf/rsqrtf.
    let output = Command::new(nvcc)
        .args(["--fatbin", "-O3", "-std=c++17", "-lineinfo"])
        .args(["-gencode", "arch=compute_90,code=sm_90"])
        .args(["-gencode", "arch=compute_80,code=compute_80"])
        .args(["-Xptxas", "-v"])
        .arg("-I")
        .arg(include)
        .arg("-o")
        .arg(&fatbin)
        .arg(src)
        .output()
        .map_err(|e| format!("could not run {}: {e}", nvcc.display()))?;
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    // The register/spill report is useful for tuning; keep it next to the fatbin.
    let _ = fs::write(out_dir.join(format!("{stem}.ptxas.log")), &log);
    if !output.status.success() {
        return Err(format!(
            "nvcc failed on {} ({}):\n{}{}",
            src.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            log
        ));
    }
    Ok((stem, fatbin))
}

fn write_embed_file(out_dir: &Path, built: &[(String, PathBuf)]) {
    let mut s = String::from("/// (kernel file stem, fatbin bytes), generated by build.rs.\n");
    s.push_str("pub const KERNEL_FATBINS: &[(&str, &[u8])] = &[\n");
    for (stem, path) in built {
        s.push_str(&format!(
            "    ({stem:?}, include_bytes!({:?})),\n",
            path.display().to_string()
        ));
    }
    s.push_str("];\n");
    fs::write(out_dir.join("cuda_kernels.rs"), s).expect("write OUT_DIR/cuda_kernels.rs");
}
