//! The process's spare feature-map buffers.

use std::sync::{Mutex, PoisonError};

/// Feature-map buffers handed back by finished layers (`recycle`), reused by later ones
/// (`map_buffer`): a forward pass would otherwise have fresh pages zeroed for tens of MB that
/// it is about to overwrite.
static SPARE_MAPS: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// Spare buffers kept at most (a CNN forward holds about ten maps at a time).
const SPARE_LIMIT: usize = 16;

/// A buffer of `n` floats with **unspecified contents**: the caller must write every float
/// before reading it. The smallest spare buffer that holds `n` floats, else a new one.
pub fn map_buffer(n: usize) -> Vec<f32> {
    let mut spare = SPARE_MAPS.lock().unwrap_or_else(PoisonError::into_inner);
    let best = spare.iter().enumerate().filter(|(_, v)| v.capacity() >= n).min_by_key(|(_, v)| v.capacity());
    let mut v = match best.map(|(i, _)| i) {
        Some(i) => spare.swap_remove(i),
        None => Vec::new(),
    };
    drop(spare);
    if v.len() >= n {
        v.truncate(n);
    } else {
        v.resize(n, 0.0);
    }
    v
}

/// Hands a feature map that is no longer needed back for `map_buffer`; beyond `SPARE_LIMIT`
/// spare buffers the smallest is dropped, so the large maps stay.
pub fn recycle(v: Vec<f32>) {
    let mut spare = SPARE_MAPS.lock().unwrap_or_else(PoisonError::into_inner);
    spare.push(v);
    if spare.len() > SPARE_LIMIT {
        let smallest = (0..spare.len()).min_by_key(|&i| spare[i].capacity()).expect("not empty");
        spare.swap_remove(smallest);
    }
}
