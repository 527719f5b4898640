//! Teacher targets and chain data cached in the file named by `LINLY_DISTILL_CACHE`, for
//! experiments that vary only the fits (a teacher pass over the fitting text costs minutes).

use super::DistillContext;
use crate::vocab::chain::ChainData;

/// Keyed by the contexts' ids: a cache made from other contexts is ignored.
fn cache_key(contexts: &[DistillContext]) -> u64 {
    contexts.iter().flat_map(|c| c.old_ids.iter()).fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

pub(super) fn teacher_cache_load(contexts: &[DistillContext], d: usize) -> Option<Vec<Vec<f32>>> {
    let path = std::env::var_os("LINLY_DISTILL_CACHE")?;
    let bytes = std::fs::read(path).ok()?;
    if bytes.len() < 8 || u64::from_le_bytes(bytes[..8].try_into().ok()?) != cache_key(contexts) {
        return None;
    }
    let v: Vec<f32> = bytes[8..].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let mut out = Vec::new();
    let mut off = 0;
    for c in contexts {
        let n = c.new_ids.len() * d;
        out.push(v.get(off..off + n)?.to_vec());
        off += n;
    }
    Some(out)
}

pub(super) fn teacher_cache_save(contexts: &[DistillContext], targets: &[Vec<f32>]) {
    let Some(path) = std::env::var_os("LINLY_DISTILL_CACHE") else { return };
    let mut bytes = cache_key(contexts).to_le_bytes().to_vec();
    for t in targets {
        for x in t {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
    }
    let _ = crate::io::atomic::write(std::path::Path::new(&path), &bytes);
}

fn chain_cache_path() -> Option<std::path::PathBuf> {
    let mut p = std::env::var_os("LINLY_DISTILL_CACHE")?;
    p.push(".chain");
    Some(p.into())
}

pub(super) fn chain_cache_load(contexts: &[DistillContext]) -> Option<ChainData> {
    let bytes = std::fs::read(chain_cache_path()?).ok()?;
    let mut r = bytes.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    if r.next()? != cache_key(contexts) {
        return None;
    }
    let (n_roots, n_p1, n_path, n_off) = (r.next()? as usize, r.next()? as usize, r.next()? as usize, r.next()? as usize);
    let body = &bytes[40..];
    let f = |i: usize| f32::from_le_bytes(body[i * 4..i * 4 + 4].try_into().unwrap());
    let u = |i: usize| u32::from_le_bytes(body[i * 4..i * 4 + 4].try_into().unwrap());
    if body.len() != (n_p1 + 2 * n_path + n_off) * 4 {
        return None;
    }
    let p1 = (0..n_p1).map(f).collect();
    let path = (0..n_path).map(|k| (u(n_p1 + 2 * k), f(n_p1 + 2 * k + 1))).collect();
    let path_off = (0..n_off).map(|k| u(n_p1 + 2 * n_path + k) as usize).collect();
    Some(ChainData { n_roots, p1, path, path_off })
}

pub(super) fn chain_cache_save(contexts: &[DistillContext], cd: &ChainData) {
    let Some(path) = chain_cache_path() else { return };
    let mut b = Vec::new();
    for v in [cache_key(contexts), cd.n_roots as u64, cd.p1.len() as u64, cd.path.len() as u64, cd.path_off.len() as u64] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    cd.p1.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
    cd.path.iter().for_each(|(n, p)| {
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&p.to_le_bytes());
    });
    cd.path_off.iter().for_each(|&o| b.extend_from_slice(&(o as u32).to_le_bytes()));
    let _ = crate::io::atomic::write(&path, &b);
}
