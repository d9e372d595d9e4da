// Torch bindings of freeatm_kernels._C: registers the ops under torch.ops.freeatm_C.* when the module is imported.
//
// Schemas (agreed with kernels/cross_attention_with_maps.py and kernels/mask_pool.py, which call them as is):
//   cross_attention_with_maps(Tensor q, Tensor k, Tensor v, Tensor(a!) maps, Tensor row_of_batch, Tensor? tokens,
//                             float scale, float weight) -> Tensor
//   mask_pool_forward(Tensor features, Tensor masks, float eps) -> (Tensor pooled, Tensor mass)
//   mask_pool_backward(Tensor grad_pooled, Tensor features, Tensor masks, float eps) -> Tensor grad_features
//
// Each op has a CUDA kernel (csrc/*.cu through the raw-pointer launchers of freeatm_kernels.h), a Meta kernel that
// runs the same argument checks and returns empty outputs of the right shape (what FakeTensor / torch.compile use
// to trace), and a CPU kernel that raises a clear error instead of the dispatcher's generic "could not run" message.
// The autograd of mask_pool lives on the Python side (freeatm::mask_pool's register_autograd calls
// mask_pool_backward); cross_attention_with_maps is inference only.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "freeatm_kernels.h"

namespace {

using freeatm::DType;

constexpr int64_t kMaxBlocks = std::numeric_limits<int32_t>::max();  // grids are flattened into blockIdx.x
constexpr int64_t kMaxInt = std::numeric_limits<int32_t>::max();     // sizes the kernels index with int

DType float_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

DType mask_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kByte:
      return DType::kUInt8;
    case at::kBool:
      return DType::kBool;
    default:
      TORCH_CHECK(false, op, ": masks must be float32, float16, bfloat16, uint8 or bool, got ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device(),
              " (the CPU path is freeatm_kernels' backend='torch' or backend='triton')");
  TORCH_CHECK(t.device() == ref.device(), op, ": all tensors must be on one device, got ", name, " on ", t.device(),
              " and the first input on ", ref.device());
}

// ---------------------------------------------------------------------------------------------------------------
// cross_attention_with_maps

struct CrossAttentionShapes {
  int64_t B, H, N, T, D, TM, num_map_rows;
};

// Device-independent checks, shared by the CUDA and Meta kernels.
CrossAttentionShapes check_cross_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& maps, const at::Tensor& row_of_batch,
                                                const std::optional<at::Tensor>& tokens) {
  constexpr const char* op = "freeatm_C::cross_attention_with_maps";
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": q, k, v must be 4-D [B, H, N, D] / [B, H, T, D], got q ", q.sizes(), ", k ", k.sizes(), ", v ",
              v.sizes());
  float_dtype(q, op, "q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), T = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(1) == H && k.size(3) == D, op,
              ": expected k and v of shape [B, H, T, D] = [", B, ", ", H, ", T, ", D, "] with q ", q.sizes(),
              ", got k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(H >= 1 && D >= 1 && T >= 1, op, ": H, T and D must be >= 1, got q ", q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(T <= freeatm::kCrossAttentionMaxT && D <= freeatm::kCrossAttentionMaxD, op, ": supports T <= ",
              freeatm::kCrossAttentionMaxT, " and D <= ", freeatm::kCrossAttentionMaxD, ", got q ", q.sizes(), ", k ",
              k.sizes());
  TORCH_CHECK(N <= kMaxInt, op, ": N must fit in int32, got q ", q.sizes());
  const auto check_last_dim = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.stride(3) == 1 || t.size(3) == 1, op, ": the last dimension of ", name,
                " must be contiguous (stride 1), got shape ", t.sizes(), " strides ", t.strides());
  };
  check_last_dim(q, "q");
  check_last_dim(k, "k");
  check_last_dim(v, "v");

  TORCH_CHECK(maps.scalar_type() == at::kFloat, op, ": maps must be float32, got ", maps.scalar_type());
  TORCH_CHECK(maps.dim() == 3 && maps.size(2) == N, op, ": maps must be [B', T or K, N] with N = ", N,
              ", got maps ", maps.sizes(), " for q ", q.sizes());
  TORCH_CHECK(maps.is_contiguous(), op, ": maps must be contiguous (it is updated in place), got shape ",
              maps.sizes(), " strides ", maps.strides());
  const int64_t num_map_rows = maps.size(0);
  const int64_t TM = maps.size(1);
  TORCH_CHECK(row_of_batch.scalar_type() == at::kLong && row_of_batch.dim() == 1 && row_of_batch.size(0) == B, op,
              ": row_of_batch must be int64 [B] with B = ", B, ", got ", row_of_batch.scalar_type(), " ",
              row_of_batch.sizes());
  if (tokens.has_value()) {
    const at::Tensor& tok = *tokens;
    TORCH_CHECK(tok.scalar_type() == at::kLong && tok.dim() == 2 && tok.size(0) == num_map_rows && tok.size(1) == TM,
                op, ": tokens must be int64 [B', K] matching maps [B', K, N] = ", maps.sizes(), ", got ",
                tok.scalar_type(), " ", tok.sizes());
  } else {
    TORCH_CHECK(TM == T, op, ": without tokens, maps must be [B', T, N] with T = ", T, ", got maps ", maps.sizes());
  }
  return {B, H, N, T, D, TM, num_map_rows};
}

at::Tensor cross_attention_with_maps_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          at::Tensor& maps, const at::Tensor& row_of_batch,
                                          const std::optional<at::Tensor>& tokens, double scale, double weight) {
  constexpr const char* op = "freeatm_C::cross_attention_with_maps";
  check_cuda(q, q, op, "q");
  check_cuda(k, q, op, "k");
  check_cuda(v, q, op, "v");
  check_cuda(maps, q, op, "maps");
  check_cuda(row_of_batch, q, op, "row_of_batch");
  if (tokens.has_value()) check_cuda(*tokens, q, op, "tokens");
  const CrossAttentionShapes s = check_cross_attention_args(q, k, v, maps, row_of_batch, tokens);

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({s.B, s.H, s.N, s.D}, q.options());
  if (out.numel() == 0) return out;
  TORCH_CHECK(s.B * ((s.N + 15) / 16) <= kMaxBlocks, op, ": too many query tiles for one launch, got q ", q.sizes());
  const size_t smem = freeatm::cross_attention_with_maps_smem_bytes(s.T, s.D);
  const auto* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(smem <= props->sharedMemPerBlockOptin, op, ": needs ", smem, " bytes of shared memory for T = ", s.T,
              ", D = ", s.D, " but ", props->name, " allows ", props->sharedMemPerBlockOptin, " per block");

  // small index tensors: a contiguous copy (if needed at all) is cheap and keeps the kernel's indexing simple
  const at::Tensor rows = row_of_batch.contiguous();
  const std::optional<at::Tensor> toks =
      tokens.has_value() ? std::optional<at::Tensor>(tokens->contiguous()) : std::nullopt;

  freeatm::CrossAttentionWithMapsParams p{};
  p.dtype = float_dtype(q, op, "q");
  p.q = q.data_ptr();
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.q_stride_n = q.stride(2);
  p.k = k.data_ptr();
  p.k_stride_b = k.stride(0);
  p.k_stride_h = k.stride(1);
  p.k_stride_t = k.stride(2);
  p.v = v.data_ptr();
  p.v_stride_b = v.stride(0);
  p.v_stride_h = v.stride(1);
  p.v_stride_t = v.stride(2);
  p.out = out.data_ptr();
  p.maps = maps.data_ptr<float>();
  p.row_of_batch = rows.data_ptr<int64_t>();
  p.tokens = toks.has_value() ? toks->data_ptr<int64_t>() : nullptr;
  p.B = s.B;
  p.H = s.H;
  p.N = s.N;
  p.T = s.T;
  p.D = s.D;
  p.TM = s.TM;
  p.num_map_rows = s.num_map_rows;
  p.scale = scale;
  p.weight = weight;
  C10_CUDA_CHECK(freeatm::cross_attention_with_maps_launch(p, at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor cross_attention_with_maps_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          at::Tensor& maps, const at::Tensor& row_of_batch,
                                          const std::optional<at::Tensor>& tokens, double scale, double weight) {
  const CrossAttentionShapes s = check_cross_attention_args(q, k, v, maps, row_of_batch, tokens);
  return at::empty({s.B, s.H, s.N, s.D}, q.options());
}

at::Tensor cross_attention_with_maps_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         at::Tensor& maps, const at::Tensor& row_of_batch,
                                         const std::optional<at::Tensor>& tokens, double scale, double weight) {
  TORCH_CHECK(false,
              "freeatm_C::cross_attention_with_maps runs on CUDA tensors only, got q on ", q.device(),
              "; on CPU use freeatm_kernels.cross_attention_with_maps(..., backend='torch')");
}

// ---------------------------------------------------------------------------------------------------------------
// mask_pool

struct MaskPoolShapes {
  int64_t B, C, h, w, K, Hm, Wm;
};

MaskPoolShapes check_mask_pool_args(const at::Tensor& features, const at::Tensor& masks, const char* op) {
  TORCH_CHECK(features.dim() == 4, op, ": features must be 4-D [B, C, h, w], got ", features.sizes());
  TORCH_CHECK(masks.dim() == 4, op, ": masks must be 4-D [B, K, H, W], got ", masks.sizes());
  float_dtype(features, op, "features");
  mask_dtype(masks, op);
  const int64_t B = features.size(0), C = features.size(1), h = features.size(2), w = features.size(3);
  const int64_t K = masks.size(1), Hm = masks.size(2), Wm = masks.size(3);
  TORCH_CHECK(masks.size(0) == B, op, ": masks and features must have the same batch size, got masks ", masks.sizes(),
              " and features ", features.sizes());
  TORCH_CHECK(h >= 1 && w >= 1 && Hm >= h && Wm >= w && Hm % h == 0 && Wm % w == 0, op,
              ": the mask size [H, W] must be a positive integer multiple of the feature size [h, w], got masks ",
              masks.sizes(), " and features ", features.sizes());
  TORCH_CHECK(masks.is_contiguous(), op, ": masks must be contiguous, got shape ", masks.sizes(), " strides ",
              masks.strides());
  TORCH_CHECK(Hm * Wm <= kMaxInt && C <= kMaxInt && K <= kMaxInt && h * w <= kMaxInt, op,
              ": sizes must fit in int32, got masks ", masks.sizes(), " and features ", features.sizes());
  return {B, C, h, w, K, Hm, Wm};
}

void check_grad_pooled(const at::Tensor& grad_pooled, const MaskPoolShapes& s, const char* op) {
  TORCH_CHECK(grad_pooled.dim() == 3 && grad_pooled.size(0) == s.B && grad_pooled.size(1) == s.K &&
                  grad_pooled.size(2) == s.C,
              op, ": grad_pooled must be [B, K, C] = [", s.B, ", ", s.K, ", ", s.C, "], got ", grad_pooled.sizes());
  TORCH_CHECK(at::isFloatingType(grad_pooled.scalar_type()), op, ": grad_pooled must be a floating tensor, got ",
              grad_pooled.scalar_type());
}

void check_launch_size(int64_t blocks, const char* op, const at::Tensor& features, const at::Tensor& masks) {
  TORCH_CHECK(blocks <= kMaxBlocks, op, ": too many blocks for one launch, got features ", features.sizes(),
              " and masks ", masks.sizes());
}

// Fills the fp32 workspace weights[b, k, p] = m / (den + eps) (and mass when given) on the current stream.
at::Tensor mask_pool_weights(const at::Tensor& masks, const MaskPoolShapes& s, double eps, float* mass,
                             const char* op, const at::Tensor& features) {
  at::Tensor weights = at::empty({s.B, s.K, s.h * s.w}, masks.options().dtype(at::kFloat));
  check_launch_size(s.B * s.K, op, features, masks);
  C10_CUDA_CHECK(freeatm::mask_pool_weights_launch(mask_dtype(masks, op), masks.data_ptr(),
                                                   weights.data_ptr<float>(), mass, s.B, s.K, s.Hm, s.Wm, s.h, s.w,
                                                   static_cast<float>(eps), at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return weights;
}

std::tuple<at::Tensor, at::Tensor> mask_pool_forward_cuda(const at::Tensor& features, const at::Tensor& masks,
                                                          double eps) {
  constexpr const char* op = "freeatm_C::mask_pool_forward";
  check_cuda(features, features, op, "features");
  check_cuda(masks, features, op, "masks");
  const MaskPoolShapes s = check_mask_pool_args(features, masks, op);

  const c10::cuda::CUDAGuard guard(features.device());
  at::Tensor pooled = at::empty({s.B, s.K, s.C}, features.options());
  at::Tensor mass = at::empty({s.B, s.K}, features.options().dtype(at::kFloat));
  if (mass.numel() == 0) return {pooled, mass};
  const at::Tensor weights = mask_pool_weights(masks, s, eps, mass.data_ptr<float>(), op, features);
  if (pooled.numel() == 0) return {pooled, mass};
  check_launch_size(s.B * ((s.C + 31) / 32) * ((s.K + 7) / 8), op, features, masks);
  const int64_t strides[4] = {features.stride(0), features.stride(1), features.stride(2), features.stride(3)};
  C10_CUDA_CHECK(freeatm::mask_pool_forward_launch(float_dtype(features, op, "features"), features.data_ptr(),
                                                   strides, weights.data_ptr<float>(), pooled.data_ptr(), s.B, s.K,
                                                   s.C, s.h, s.w, at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {pooled, mass};
}

std::tuple<at::Tensor, at::Tensor> mask_pool_forward_meta(const at::Tensor& features, const at::Tensor& masks,
                                                          double eps) {
  const MaskPoolShapes s = check_mask_pool_args(features, masks, "freeatm_C::mask_pool_forward");
  return {at::empty({s.B, s.K, s.C}, features.options()),
          at::empty({s.B, s.K}, features.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor> mask_pool_forward_cpu(const at::Tensor& features, const at::Tensor& masks,
                                                         double eps) {
  TORCH_CHECK(false, "freeatm_C::mask_pool_forward runs on CUDA tensors only, got features on ", features.device(),
              "; on CPU use freeatm_kernels.mask_pool(..., backend='torch')");
}

at::Tensor mask_pool_backward_cuda(const at::Tensor& grad_pooled, const at::Tensor& features, const at::Tensor& masks,
                                   double eps) {
  constexpr const char* op = "freeatm_C::mask_pool_backward";
  check_cuda(features, features, op, "features");
  check_cuda(masks, features, op, "masks");
  check_cuda(grad_pooled, features, op, "grad_pooled");
  const MaskPoolShapes s = check_mask_pool_args(features, masks, op);
  check_grad_pooled(grad_pooled, s, op);

  const c10::cuda::CUDAGuard guard(features.device());
  // same shape, dtype and layout as features (channels_last stays channels_last)
  at::Tensor grad_features = at::empty_like(features);
  if (grad_features.numel() == 0) return grad_features;
  const at::Tensor grad = grad_pooled.to(at::kFloat).contiguous();  // [B, K, C], tiny next to the features
  const at::Tensor weights = mask_pool_weights(masks, s, eps, nullptr, op, features);
  const bool channels_fastest = grad_features.stride(1) == 1;
  const int64_t CT = channels_fastest ? 32 : 8, PT = channels_fastest ? 8 : 32;
  check_launch_size(s.B * ((s.C + CT - 1) / CT) * ((s.h * s.w + PT - 1) / PT), op, features, masks);
  const int64_t strides[4] = {grad_features.stride(0), grad_features.stride(1), grad_features.stride(2),
                              grad_features.stride(3)};
  C10_CUDA_CHECK(freeatm::mask_pool_backward_launch(float_dtype(features, op, "features"), grad.data_ptr<float>(),
                                                    weights.data_ptr<float>(), grad_features.data_ptr(), strides, s.B,
                                                    s.K, s.C, s.h, s.w, at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_features;
}

at::Tensor mask_pool_backward_meta(const at::Tensor& grad_pooled, const at::Tensor& features, const at::Tensor& masks,
                                   double eps) {
  constexpr const char* op = "freeatm_C::mask_pool_backward";
  const MaskPoolShapes s = check_mask_pool_args(features, masks, op);
  check_grad_pooled(grad_pooled, s, op);
  return at::empty_like(features);
}

at::Tensor mask_pool_backward_cpu(const at::Tensor& grad_pooled, const at::Tensor& features, const at::Tensor& masks,
                                  double eps) {
  TORCH_CHECK(false, "freeatm_C::mask_pool_backward runs on CUDA tensors only, got features on ", features.device(),
              "; on CPU use freeatm_kernels.mask_pool(..., backend='torch')");
}

}  // namespace

TORCH_LIBRARY(freeatm_C, m) {
  m.def(
      "cross_attention_with_maps(Tensor q, Tensor k, Tensor v, Tensor(a!) maps, Tensor row_of_batch, Tensor? tokens, "
      "float scale, float weight) -> Tensor");
  m.def("mask_pool_forward(Tensor features, Tensor masks, float eps) -> (Tensor pooled, Tensor mass)");
  m.def("mask_pool_backward(Tensor grad_pooled, Tensor features, Tensor masks, float eps) -> Tensor grad_features");
}

TORCH_LIBRARY_IMPL(freeatm_C, CUDA, m) {
  m.impl("cross_attention_with_maps", &cross_attention_with_maps_cuda);
  m.impl("mask_pool_forward", &mask_pool_forward_cuda);
  m.impl("mask_pool_backward", &mask_pool_backward_cuda);
}

TORCH_LIBRARY_IMPL(freeatm_C, Meta, m) {
  m.impl("cross_attention_with_maps", &cross_attention_with_maps_meta);
  m.impl("mask_pool_forward", &mask_pool_forward_meta);
  m.impl("mask_pool_backward", &mask_pool_backward_meta);
}

TORCH_LIBRARY_IMPL(freeatm_C, CPU, m) {
  m.impl("cross_attention_with_maps", &cross_attention_with_maps_cpu);
  m.impl("mask_pool_forward", &mask_pool_forward_cpu);
  m.impl("mask_pool_backward", &mask_pool_backward_cpu);
}

// The ops register through the static initialisers above; the Python module only has to exist (and import).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA kernels of freeatm_kernels, registered as torch.ops.freeatm_C.*";
  m.def(
      "info", []() { return std::string("freeatm_kernels._C: torch.ops.freeatm_C.{cross_attention_with_maps, "
                                        "mask_pool_forward, mask_pool_backward}, CUDA kernels + Meta shapes"); },
      "Which ops this module registers.");
}
