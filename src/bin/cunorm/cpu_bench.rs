//! `cunorm cpu-bench`: the cunorm side of `benches/cpu_compare.py`. Reads a list of cases
//! (JSON), times each on the CPU with the requested number of threads and prints one JSON
//! object `{key: {"<threads>": ms}}` of medians.
//!
//! Timed the way `benches/cpu_compare.py` times PyTorch: the input, `dy` and the saved
//! statistics are made before the timing; the op's outputs are allocated inside it; a few
//! warm-up calls, then the median of `reps` calls. Parameters are affine (weight, and bias
//! where the op has one), as in the modules' defaults.

use std::time::Instant;

use cunorm::functional as F;
use cunorm::{bf16, f16, Element, Error, MemoryFormat, Result, Tensor};
use serde_json::{json, Value};

/// One case of the comparison.
#[derive(Clone, Debug)]
pub struct Case {
    /// The key both sides report under.
    pub key: String,
    /// `layer_norm`, `rms_norm`, `group_norm`, `batch_norm`, `instance_norm`.
    pub op: String,
    /// `f32`, `f16`, `bf16`.
    pub dtype: String,
    /// `nchw` or `nhwc`.
    pub format: String,
    /// The input shape.
    pub shape: Vec<usize>,
    /// `forward` (training statistics) or `backward`.
    pub stage: String,
    /// GroupNorm's groups.
    pub groups: usize,
}

fn field<'a>(v: &'a Value, name: &str) -> Result<&'a Value> {
    v.get(name)
        .ok_or_else(|| Error::InvalidArgument(format!("cpu-bench case {v}: no field `{name}`")))
}

fn text(v: &Value, name: &str) -> Result<String> {
    field(v, name)?
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Error::InvalidArgument(format!("cpu-bench case {v}: `{name}` not text")))
}

/// Parses the case list written by `benches/cpu_compare.py`.
pub fn parse_cases(v: &Value) -> Result<Vec<Case>> {
    let list = v
        .as_array()
        .ok_or_else(|| Error::InvalidArgument("cpu-bench cases: expected a JSON list".into()))?;
    list.iter()
        .map(|c| {
            let shape = field(c, "shape")?
                .as_array()
                .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("cpu-bench case {c}: bad `shape`"))
                })?;
            Ok(Case {
                key: text(c, "key")?,
                op: text(c, "op")?,
                dtype: text(c, "dtype")?,
                format: text(c, "format")?,
                shape,
                stage: text(c, "stage")?,
                groups: c.get("groups").and_then(Value::as_u64).unwrap_or(1) as usize,
            })
        })
        .collect()
}

fn median_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        f()?;
        t.push(start.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

fn tensor<T: Element>(shape: &[usize], seed: u64, format: MemoryFormat) -> Result<Tensor<T>> {
    let x = Tensor::<f32>::randn(shape, seed)?;
    let v: Vec<T> = x.to_vec()?.into_iter().map(T::from_f32).collect();
    let t = Tensor::from_vec(v, shape)?;
    if shape.len() >= 3 {
        t.to_format(format)
    } else {
        Ok(t)
    }
}

/// One prepared case: a call of the op on inputs made beforehand.
pub type Call = Box<dyn FnMut() -> Result<()>>;

/// Makes the inputs of a case (x, dy, parameters, and for backward the forward's saved
/// statistics) and returns the call to time.
pub fn prepare(c: &Case) -> Result<Call> {
    match c.dtype.as_str() {
        "f32" => prepare_t::<f32>(c),
        "f16" => prepare_t::<f16>(c),
        "bf16" => prepare_t::<bf16>(c),
        d => Err(Error::InvalidArgument(format!("cpu-bench: dtype `{d}`"))),
    }
}

fn prepare_t<T: Element>(c: &Case) -> Result<Call> {
    let format = match c.format.as_str() {
        "nchw" => MemoryFormat::Contiguous,
        "nhwc" => MemoryFormat::ChannelsLast,
        f => return Err(Error::InvalidArgument(format!("cpu-bench: format `{f}`"))),
    };
    let x = tensor::<T>(&c.shape, 1, format)?;
    let dy = tensor::<T>(&c.shape, 2, format)?;
    let last = *c.shape.last().unwrap_or(&1);
    let params = match c.op.as_str() {
        "layer_norm" | "rms_norm" => last,
        _ => c.shape.get(1).copied().unwrap_or(1),
    };
    let w = Tensor::<f32>::full(&[params], 1.0)?;
    let b = Tensor::<f32>::full(&[params], 0.0)?;
    let eps = 1e-5;
    let backward = match c.stage.as_str() {
        "forward" => false,
        "backward" => true,
        s => return Err(Error::InvalidArgument(format!("cpu-bench: stage `{s}`"))),
    };
    let groups = c.groups;
    let call: Call = match (c.op.as_str(), backward) {
        ("layer_norm", false) => {
            Box::new(move || F::layer_norm(&x, &[last], Some(&w), Some(&b), eps).map(drop))
        }
        ("layer_norm", true) => {
            let s = F::layer_norm(&x, &[last], Some(&w), Some(&b), eps)?.stats;
            Box::new(move || F::layer_norm_backward(&dy, &x, &[last], Some(&w), true, &s).map(drop))
        }
        ("rms_norm", false) => {
            Box::new(move || F::rms_norm(&x, &[last], Some(&w), Some(eps)).map(drop))
        }
        ("rms_norm", true) => {
            let s = F::rms_norm(&x, &[last], Some(&w), Some(eps))?.stats;
            Box::new(move || F::rms_norm_backward(&dy, &x, &[last], Some(&w), &s).map(drop))
        }
        ("group_norm", false) => {
            Box::new(move || F::group_norm(&x, groups, Some(&w), Some(&b), eps).map(drop))
        }
        ("group_norm", true) => {
            let s = F::group_norm(&x, groups, Some(&w), Some(&b), eps)?.stats;
            Box::new(move || F::group_norm_backward(&dy, &x, groups, Some(&w), &s).map(drop))
        }
        ("batch_norm", false) => Box::new(move || {
            F::batch_norm(&x, None, None, Some(&w), Some(&b), true, 0.1, eps).map(drop)
        }),
        ("batch_norm", true) => {
            let s = F::batch_norm(&x, None, None, Some(&w), Some(&b), true, 0.1, eps)?.stats;
            Box::new(move || F::batch_norm_backward(&dy, &x, Some(&w), &s).map(drop))
        }
        ("instance_norm", false) => Box::new(move || {
            F::instance_norm(&x, None, None, Some(&w), Some(&b), true, 0.1, eps).map(drop)
        }),
        ("instance_norm", true) => {
            let s = F::instance_norm(&x, None, None, Some(&w), Some(&b), true, 0.1, eps)?.stats;
            Box::new(move || F::instance_norm_backward(&dy, &x, Some(&w), &s).map(drop))
        }
        (op, _) => return Err(Error::InvalidArgument(format!("cpu-bench: op `{op}`"))),
    };
    Ok(call)
}

/// Times every case with `threads` worker threads; returns `{key: {"<threads>": ms}}`.
///
/// The ops are called from this (the main) thread with rayon's global pool sized to
/// `threads`, as a program that sets `RAYON_NUM_THREADS` runs them, and as PyTorch's side runs
/// after `torch.set_num_threads`. (Inside `ThreadPool::install` the op would run on a worker
/// thread, whose glibc arena returns a freed 16 MB output to the kernel at once: every call
/// would then fault its output in afresh, which no caller on the main thread sees.)
pub fn run(cases: &[Case], threads: usize, reps: usize) -> Result<Value> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| Error::InvalidArgument(format!("cpu-bench: thread pool: {e}")))?;
    let mut out = serde_json::Map::new();
    for c in cases {
        let ms = median_ms(reps, prepare(c)?)?;
        out.insert(c.key.clone(), json!({ threads.to_string(): ms }));
    }
    Ok(Value::Object(out))
}
