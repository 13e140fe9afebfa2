//! Finding and loading libnvrtc, compiling kernel modules to CUBIN, and the on-disk cache.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::{result as nvrtc, sys};

use crate::error::{Error, Result};

/// Kernel sources embedded by build.rs.
pub(crate) mod sources {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The entries of `dir` whose names start with `prefix`, sorted (none if `dir` is unreadable).
fn subdirs_starting_with(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .collect();
    v.sort();
    v
}

/// Folders that may hold libnvrtc, in search order: `$CUNORM_NVRTC_DIR`, `$CUDA_HOME`,
/// `$CUDA_PATH`, the usual toolkit paths, and pip's `nvidia-cuda-nvrtc` wheels.
fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("CUNORM_NVRTC_DIR") {
        dirs.push(PathBuf::from(d));
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(d) = std::env::var_os(var) {
            dirs.push(Path::new(&d).join("lib64"));
            dirs.push(Path::new(&d).join("lib"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    // /usr/local/cuda-X.Y, newest first.
    let versioned = subdirs_starting_with(Path::new("/usr/local"), "cuda-");
    dirs.extend(versioned.into_iter().rev().map(|p| p.join("lib64")));
    dirs.push(PathBuf::from("/opt/cuda/lib64"));
    dirs.push(PathBuf::from("/usr/lib/x86_64-linux-gnu"));
    // pip wheels: <site-packages>/nvidia/{cu13,cuda_nvrtc}/lib
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        roots.push(PathBuf::from(v).join("lib"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        roots.push(PathBuf::from(h).join(".local/lib"));
    }
    roots.extend(["/usr/local/lib", "/usr/lib", "/opt/conda/lib"].map(PathBuf::from));
    for root in roots {
        for py in subdirs_starting_with(&root, "python3") {
            for sp in ["site-packages", "dist-packages"] {
                for sub in [
                    "nvidia/cu13/lib",
                    "nvidia/cuda_nvrtc/lib",
                    "nvidia/cu12/lib",
                ] {
                    dirs.push(py.join(sp).join(sub));
                }
            }
        }
    }
    dirs
}

fn find_lib(dir: &Path, prefix: &str) -> Option<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(prefix) && n[prefix.len()..].starts_with(".so")
            })
        })
        .collect();
    v.sort();
    v.pop()
}

#[cfg(unix)]
fn open_global(path: &Path) -> std::result::Result<(), String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: loading NVIDIA's NVRTC libraries, whose initializers have no preconditions.
    let lib =
        unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }.map_err(|e| e.to_string())?;
    // Kept loaded for the life of the process: cudarc resolves symbols from it by name later.
    std::mem::forget(lib);
    Ok(())
}

#[cfg(not(unix))]
fn open_global(_path: &Path) -> std::result::Result<(), String> {
    Err("loading NVRTC by path is only supported on Unix; put it on PATH".into())
}

/// The CUDA major versions this build's cudarc bindings accept: the `cuda-13` / `cuda-12`
/// feature's, or either with `cuda-version-from-build-system`.
const CUDA_MAJORS: &[u32] = if cfg!(feature = "cuda-13") {
    &[13]
} else if cfg!(feature = "cuda-12") {
    &[12]
} else {
    &[13, 12]
};

/// Whether cudarc can now open libnvrtc by name.
fn nvrtc_loadable() -> bool {
    super::loadable("nvrtc", CUDA_MAJORS)
}

/// Makes libnvrtc loadable by cudarc without LD_LIBRARY_PATH. On failure the error lists every
/// place that was searched and how to fix it. Runs the search once per process.
pub fn ensure_nvrtc() -> Result<()> {
    static STATE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            if nvrtc_loadable() {
                return Ok(());
            }
            let mut tried = Vec::new();
            for dir in candidate_dirs() {
                let Some(lib) = find_lib(&dir, "libnvrtc") else {
                    tried.push(dir.display().to_string());
                    continue;
                };
                // libnvrtc opens libnvrtc-builtins by name when it compiles: load it first
                // from the same folder so that lookup succeeds.
                if let Some(b) = find_lib(&dir, "libnvrtc-builtins") {
                    if let Err(e) = open_global(&b) {
                        tried.push(format!("{} ({e})", b.display()));
                        continue;
                    }
                }
                match open_global(&lib) {
                    Ok(()) if nvrtc_loadable() => return Ok(()),
                    Ok(()) => tried.push(format!(
                        "{} (loaded, but this build of cunorm uses CUDA {major} and needs \
                         libnvrtc.so.{major}: point CUNORM_NVRTC_DIR at a CUDA {major} NVRTC \
                         or build with the feature matching this one)",
                        lib.display(),
                        major = CUDA_MAJORS[0]
                    )),
                    Err(e) => tried.push(format!("{} ({e})", lib.display())),
                }
            }
            // One sentence with the fix, then what was searched, one place a line.
            Err(format!(
                "libnvrtc not found: `pip install nvidia-cuda-nvrtc` or install the CUDA toolkit, \
                 or set CUNORM_NVRTC_DIR to the folder holding libnvrtc.so.\nSearched the library \
                 path and:\n  {}",
                tried.join("\n  ")
            ))
        })
        .clone()
        .map_err(Error::Unavailable)
}

/// NVRTC's version as (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    ensure_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (ensure_nvrtc); the out-pointers are valid locals.
    let r = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    r.result()
        .map_err(|e| Error::Unavailable(format!("nvrtcVersion failed: {e:?}")))?;
    Ok((major, minor))
}

/// The complete source of module `name`: common.cuh inlined in place of its #include.
pub fn module_source(name: &str) -> Option<String> {
    let (_, prelude, src) = sources::MODULES.iter().find(|(n, _, _)| *n == name)?;
    Some(format!(
        "{prelude}{}",
        src.replace("#include \"common.cuh\"", sources::COMMON_CUH)
    ))
}

/// Hash of every embedded kernel source file (part of each cache key).
pub fn source_hash() -> u64 {
    sources::SOURCE_HASH
}

/// Every kernel module's name.
pub fn module_names() -> impl Iterator<Item = &'static str> {
    sources::MODULES.iter().map(|(n, _, _)| *n)
}

/// Compiler options for a real architecture such as `sm_90`.
pub fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--fmad=true".into(),
    ]
}

/// What a compilation produced.
pub struct Compiled {
    /// Device code for exactly `arch` (no driver JIT).
    pub cubin: Vec<u8>,
    /// The PTX, for inspection (ptxas reports).
    pub ptx: String,
}

/// Compiles `src` with NVRTC for a real architecture (`sm_80`, `sm_90`, ...). Needs no GPU.
pub fn compile(name: &str, src: &str, arch: &str) -> Result<Compiled> {
    ensure_nvrtc()?;
    let fail = |log: String| Error::Compile {
        module: name.to_string(),
        log,
    };
    let csrc = CString::new(src).map_err(|e| fail(e.to_string()))?;
    let cname = CString::new(format!("{name}.cu")).map_err(|e| fail(e.to_string()))?;
    let prog = nvrtc::create_program(&csrc, Some(&cname)).map_err(|e| fail(format!("{e:?}")))?;
    let opts = options(arch);
    // SAFETY: `prog` is a live program from create_program, destroyed exactly once below.
    let result = unsafe {
        let compiled = nvrtc::compile_program(prog, &opts);
        let out = match compiled {
            Err(e) => {
                let log = nvrtc::get_program_log(prog)
                    .map(|l| {
                        let bytes: Vec<u8> =
                            l.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
                        String::from_utf8_lossy(&bytes).into_owned()
                    })
                    .unwrap_or_default();
                Err(fail(format!("{e:?}\n{log}")))
            }
            Ok(()) => {
                let ptx = nvrtc::get_ptx(prog).map_err(|e| fail(format!("{e:?}")))?;
                let ptx: Vec<u8> = ptx
                    .iter()
                    .map(|&c| c as u8)
                    .take_while(|&c| c != 0)
                    .collect();
                let mut size = 0usize;
                sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .map_err(|e| fail(format!("nvrtcGetCUBINSize: {e:?}")))?;
                let mut cubin = vec![0u8; size];
                sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut std::ffi::c_char)
                    .result()
                    .map_err(|e| fail(format!("nvrtcGetCUBIN: {e:?}")))?;
                Ok(Compiled {
                    cubin,
                    ptx: String::from_utf8_lossy(&ptx).into_owned(),
                })
            }
        };
        let _ = nvrtc::destroy_program(prog);
        out
    };
    result
}

// ---------------------------------------------------------------------------------------------
// On-disk cache of CUBINs, keyed by source hash, NVRTC version, architecture and options.
// ---------------------------------------------------------------------------------------------

const MAGIC: &[u8; 8] = b"CUNORM01";

fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// `$CUNORM_CACHE_DIR`, else `$XDG_CACHE_HOME/cunorm`, else `~/.cache/cunorm`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("CUNORM_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("cunorm"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("cunorm"))
}

fn cache_key(name: &str, src: &str, arch: &str) -> Result<String> {
    let (major, minor) = nvrtc_version()?;
    let mut h = fnv1a(0xcbf29ce484222325, src.as_bytes());
    h = fnv1a(h, name.as_bytes());
    h = fnv1a(h, format!("nvrtc{major}.{minor}").as_bytes());
    h = fnv1a(h, arch.as_bytes());
    for o in options(arch) {
        h = fnv1a(h, o.as_bytes());
    }
    Ok(format!("{name}-{arch}-{h:016x}.cubin"))
}

/// Reads a cache entry; `None` when missing, truncated or corrupt (never trusted).
fn read_entry(path: &Path) -> Option<Vec<u8>> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.len() < 24 || &bytes[..8] != MAGIC {
        return None;
    }
    let len = u64::from_le_bytes(bytes[8..16].try_into().ok()?) as usize;
    let sum = u64::from_le_bytes(bytes[16..24].try_into().ok()?);
    let payload = &bytes[24..];
    (payload.len() == len && fnv1a(0xcbf29ce484222325, payload) == sum).then(|| payload.to_vec())
}

fn write_entry(path: &Path, payload: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut bytes = Vec::with_capacity(payload.len() + 24);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&fnv1a(0xcbf29ce484222325, payload).to_le_bytes());
    bytes.extend_from_slice(payload);
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, path)
}

/// The CUBIN of module `name` for `arch`: from the disk cache when a valid entry exists, else
/// compiled and stored (a cache that cannot be written is not an error).
pub fn cubin_cached(name: &str, arch: &str) -> Result<Vec<u8>> {
    let src = module_source(name).ok_or_else(|| Error::Compile {
        module: name.into(),
        log: "no such kernel module".into(),
    })?;
    let path = cache_dir().map(|d| d.join(cache_key(name, &src, arch).unwrap_or_default()));
    if let Some(p) = &path {
        if let Some(hit) = read_entry(p) {
            return Ok(hit);
        }
    }
    let compiled = compile(name, &src, arch)?;
    if let Some(p) = &path {
        let _ = write_entry(p, &compiled.cubin);
    }
    Ok(compiled.cubin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_entries_are_validated() {
        let dir = std::env::temp_dir().join(format!("cunorm-cache-test-{}", std::process::id()));
        let p = dir.join("x.cubin");
        write_entry(&p, b"hello cubin").unwrap();
        assert_eq!(read_entry(&p).as_deref(), Some(&b"hello cubin"[..]));
        // Corrupt one payload byte: the entry must be rejected.
        let mut bytes = std::fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(read_entry(&p), None);
        // Truncated entry.
        std::fs::write(&p, &bytes[..20]).unwrap();
        assert_eq!(read_entry(&p), None);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn every_module_inlines_common() {
        let names: Vec<_> = module_names().collect();
        // rows.cu and planes.cu are compiled per dtype, each module with its define.
        for (file, dt, define) in [("rows", "bf16", "BF16"), ("planes", "f16", "F16")] {
            let m = format!("{file}.{dt}");
            assert!(names.contains(&m.as_str()) && !names.contains(&file));
            let src = module_source(&m).unwrap();
            assert!(src.starts_with(&format!("#define CUNORM_ONLY_{define}\n")));
        }
        assert!(names.contains(&"util"));
        for n in names {
            let s = module_source(n).unwrap();
            assert!(!s.contains("#include"), "{n} still includes a header");
            assert!(s.contains("struct Welford"));
        }
    }
}
