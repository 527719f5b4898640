//! `--device cpu|cuda:N` → a burn device. The CPU backend is flex (pure Rust); CUDA goes
//! through libtorch and exists only in builds with `--features tch` (which also offer
//! `libtorch-cpu`, libtorch's CPU backend, to check that path without a GPU).

use anyhow::{bail, Result};
use burn::tensor::Device;

/// Parses a device name.
pub fn parse(name: &str) -> Result<Device> {
    let name = name.trim().to_ascii_lowercase();
    if name == "cpu" {
        return cpu();
    }
    if name == "libtorch-cpu" {
        // libtorch's CPU backend: checks the GPU code path (burn-tch) on a machine without one.
        #[cfg(feature = "tch")]
        #[allow(deprecated)]
        return Ok(Device::libtorch());
        #[cfg(not(feature = "tch"))]
        bail!("`libtorch-cpu` needs a build with `--features tch`");
    }
    if let Some(idx) = name.strip_prefix("cuda") {
        let idx = idx.strip_prefix(':').unwrap_or(if idx.is_empty() { "0" } else { idx });
        let idx: usize = idx.parse().map_err(|_| anyhow::anyhow!("bad device `{name}`: use cpu or cuda:N"))?;
        return cuda(idx);
    }
    bail!("unknown device `{name}`: use cpu or cuda:N")
}

#[cfg(feature = "flex")]
fn cpu() -> Result<Device> {
    Ok(Device::flex())
}

#[cfg(not(feature = "flex"))]
fn cpu() -> Result<Device> {
    #[allow(deprecated)]
    #[cfg(feature = "tch")]
    return Ok(Device::libtorch());
    #[cfg(not(feature = "tch"))]
    bail!("this build has no CPU backend: rebuild with the default `flex` feature")
}

#[cfg(feature = "tch")]
fn cuda(idx: usize) -> Result<Device> {
    #[allow(deprecated)]
    let d = Device::libtorch_cuda(idx);
    // libtorch panics on a missing device; probe once so the user gets an error instead.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let probe = std::panic::catch_unwind(|| {
        let t: burn::tensor::Tensor<1> = burn::tensor::Tensor::zeros([1], &d);
        let _ = t.into_data();
    });
    std::panic::set_hook(hook);
    match probe {
        Ok(()) => Ok(d),
        Err(_) => bail!("cuda:{idx} is not available (no CUDA device, or libtorch was built without CUDA); use --device cpu"),
    }
}

#[cfg(not(feature = "tch"))]
fn cuda(_idx: usize) -> Result<Device> {
    bail!("this build has no GPU backend: rebuild with `--features tch` (see scripts/setup-libtorch.sh)")
}
