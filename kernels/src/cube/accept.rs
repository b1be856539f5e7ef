//! Greedy acceptance on CubeCL: one unit per block compares its drafts with the verifier's argmax
//! rows and writes `(accepted, token)`, so two integers per block cross to the host.

use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;

/// Units per cube.
const UNITS: u32 = 64;

#[cube(launch_unchecked)]
fn accept_kernel<I: Int>(
    argmax: &Array<I>,
    drafts: &Array<I>,
    plan: &Array<I>,
    out: &mut Array<I>,
    blocks: u32,
    #[define(I)] _dtype: StorageType,
) {
    let b = ABSOLUTE_POS;
    if b >= blocks as usize {
        terminate!();
    }
    // Per block: its first logit row, its first draft, its number of drafts.
    let row = usize::cast_from(plan[3 * b]);
    let first = usize::cast_from(plan[3 * b + 1]);
    let len = usize::cast_from(plan[3 * b + 2]);
    let mut accepted = len;
    let mut open = true;
    for i in 0..len {
        if open && argmax[row + i] != drafts[first + i] {
            accepted = i;
            open = false;
        }
    }
    out[2 * b] = I::cast_from(accepted);
    out[2 * b + 1] = argmax[row + accepted];
}

/// Launches acceptance for `blocks` blocks into `out` (`2 · blocks` integers). `plan` holds
/// `(first row, first draft, drafts)` per block; every tensor is contiguous and of one int dtype.
pub fn launch<R: CubeRuntime>(
    argmax: CubeTensor<R>,
    drafts: CubeTensor<R>,
    plan: CubeTensor<R>,
    out: &CubeTensor<R>,
    blocks: usize,
) {
    let client = argmax.client.clone();
    let dtype = argmax.dtype;
    let len = |t: &CubeTensor<R>| t.meta.shape().num_elements();
    // SAFETY: each array is bound to its tensor's own handle with the tensor's own element count
    // (all contiguous, of the one int dtype the kernel is compiled for). A unit past `blocks`
    // returns before reading; unit `b` reads `plan[3b..3b + 3]` (`plan` holds three integers per
    // block), `argmax` rows and drafts inside the ranges the caller's plan names, and writes
    // `out[2b..2b + 2]` (`out` holds two per block).
    unsafe {
        accept_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static((blocks as u32).div_ceil(UNITS), 1, 1),
            CubeDim::new_1d(UNITS),
            ArrayArg::from_raw_parts(argmax.handle.clone(), len(&argmax)),
            ArrayArg::from_raw_parts(drafts.handle.clone(), len(&drafts)),
            ArrayArg::from_raw_parts(plan.handle.clone(), len(&plan)),
            ArrayArg::from_raw_parts(out.handle.clone(), len(out)),
            blocks as u32,
            dtype.into(),
        );
    }
}
