//! The kernels on a fused backend: each call becomes one custom operation of the fusion stream,
//! which runs the inner backend's kernel when the stream reaches it.

use std::marker::PhantomData;

use burn::prelude::*;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

use super::{CubeOps, Epilogue};
use crate::pool::PoolLayout;

type Handles<B> =
    HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

/// A recorded skinny product; its inputs are `x, w` and then `w2` or the residual.
#[derive(Debug)]
struct SkinnyOp<B> {
    desc: CustomOpIr,
    epilogue: Epilogue,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + CubeOps> Operation<B::FusionRuntime> for SkinnyOp<B> {
    fn execute(&self, handles: &mut Handles<B>) {
        let mut inputs = self
            .desc
            .inputs
            .iter()
            .map(|t| handles.get_float_tensor::<B>(t));
        let (Some(x), Some(w)) = (inputs.next(), inputs.next()) else {
            unreachable!("a skinny product records x and w");
        };
        let extra = inputs.next();
        let (w2, residual) = match self.epilogue {
            Epilogue::SwiGlu => (extra, None),
            Epilogue::Residual => (None, extra),
            Epilogue::Plain => (None, None),
        };
        let out = B::skinny(x, w, w2, residual, self.epilogue);
        handles.register_float_tensor::<B>(&self.desc.outputs[0].id, out);
    }
}

/// A recorded acceptance; its inputs are the argmax, the drafts and the plan.
#[derive(Debug)]
struct AcceptOp<B> {
    desc: CustomOpIr,
    blocks: usize,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + CubeOps> Operation<B::FusionRuntime> for AcceptOp<B> {
    fn execute(&self, handles: &mut Handles<B>) {
        let ([argmax, drafts, plan], [out]) = self.desc.as_fixed();
        let result = B::accept(
            handles.get_int_tensor::<B>(argmax),
            handles.get_int_tensor::<B>(drafts),
            handles.get_int_tensor::<B>(plan),
            self.blocks,
        );
        handles.register_int_tensor::<B>(&out.id, result);
    }
}

/// A recorded pooled attention; its inputs are `q`, the step's keys and values, the pools, the
/// RoPE tables and the plan (last, an int tensor).
#[derive(Debug)]
struct AttentionOp<B> {
    desc: CustomOpIr,
    layout: PoolLayout,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + CubeOps> Operation<B::FusionRuntime> for AttentionOp<B> {
    fn execute(&self, handles: &mut Handles<B>) {
        let ([q, sk, sv, pk, pv, cos, sin, plan], [out]) = self.desc.as_fixed();
        let mut f = |t| handles.get_float_tensor::<B>(t);
        let (q, sk, sv, pk, pv, cos, sin) = (f(q), f(sk), f(sv), f(pk), f(pv), f(cos), f(sin));
        let plan = handles.get_int_tensor::<B>(plan);
        let result = B::window_attention(q, sk, sv, pk, pv, cos, sin, plan, self.layout);
        handles.register_float_tensor::<B>(&out.id, result);
    }
}

/// Records `op` over `inputs` with one output of `shape` and `dtype`.
fn record<B, O>(
    id: &'static str,
    inputs: Vec<FusionTensor<B::FusionRuntime>>,
    shape: Shape,
    dtype: burn::tensor::DType,
    op: impl FnOnce(CustomOpIr) -> O,
) -> FusionTensor<B::FusionRuntime>
where
    B: FusionBackend,
    O: Operation<B::FusionRuntime> + 'static,
{
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(&inputs);
    let out = TensorIr::uninit(client.create_empty_handle(), shape, dtype);
    let irs: Vec<TensorIr> = inputs.into_iter().map(FusionTensor::into_ir).collect();
    let desc = CustomOpIr::new(id, &irs, &[out]);
    client
        .register(streams, OperationIr::Custom(desc.clone()), op(desc))
        .output()
}

impl<B: FusionBackend + CubeOps> CubeOps for Fusion<B> {
    fn skinny(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        w2: Option<FloatTensor<Self>>,
        residual: Option<FloatTensor<Self>>,
        epilogue: Epilogue,
    ) -> FloatTensor<Self> {
        let shape = Shape::new([x.shape[0], w.shape[1]]);
        let dtype = x.dtype;
        let mut inputs = vec![x, w];
        inputs.extend(w2);
        inputs.extend(residual);
        record::<B, _>(
            "troupe_skinny",
            inputs,
            shape,
            dtype,
            |desc| SkinnyOp::<B> {
                desc,
                epilogue,
                _backend: PhantomData,
            },
        )
    }

    fn accept(
        argmax: IntTensor<Self>,
        drafts: IntTensor<Self>,
        plan: IntTensor<Self>,
        blocks: usize,
    ) -> IntTensor<Self> {
        let dtype = argmax.dtype;
        let shape = Shape::new([2 * blocks]);
        record::<B, _>(
            "troupe_accept",
            vec![argmax, drafts, plan],
            shape,
            dtype,
            |desc| AcceptOp::<B> {
                desc,
                blocks,
                _backend: PhantomData,
            },
        )
    }

    fn window_attention(
        q: FloatTensor<Self>,
        step_k: FloatTensor<Self>,
        step_v: FloatTensor<Self>,
        pool_k: FloatTensor<Self>,
        pool_v: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        plan: IntTensor<Self>,
        layout: PoolLayout,
    ) -> FloatTensor<Self> {
        let (shape, dtype) = (q.shape.clone(), q.dtype);
        let inputs = vec![q, step_k, step_v, pool_k, pool_v, cos, sin, plan];
        record::<B, _>("troupe_pooled_attention", inputs, shape, dtype, |desc| {
            AttentionOp::<B> {
                desc,
                layout,
                _backend: PhantomData,
            }
        })
    }
}
