// Raw-pointer launchers of the CUDA kernels in freeatm_kernels._C (DESIGN.md §3).
//
// The .cu files include no torch header: they see pointers, sizes and strides only, which keeps them quick to
// compile and lets `nvcc -c` build them on their own. freeatm_ops.cpp checks devices, dtypes, shapes and strides,
// allocates the outputs and calls these launchers on the current stream. Each launcher issues exactly one kernel
// launch (none when there is no work); the caller reads launch errors with C10_CUDA_KERNEL_LAUNCH_CHECK(), and the
// returned cudaError_t reports the one runtime call a launcher may make before launching (raising the
// dynamic-shared-memory limit).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace freeatm {

// Element types the kernels are instantiated for (the binding maps torch dtypes onto these).
enum class DType : int { kFloat32, kFloat16, kBFloat16, kUInt8, kBool };

// ---------------------------------------------------------------------------------------------------------------
// cross_attention_with_maps: out = softmax(q k^T * scale) v per (b, h), and
// maps[row_of_batch[b], t', n] += weight / H * sum_h p[b, h, n, tok(t')].
struct CrossAttentionWithMapsParams {
  DType dtype;  // of q, k, v and out: kFloat32, kFloat16 or kBFloat16
  const void* q;
  int64_t q_stride_b, q_stride_h, q_stride_n;  // q: [B, H, N, D], stride 1 along D
  const void* k;
  int64_t k_stride_b, k_stride_h, k_stride_t;  // k: [B, H, T, D], stride 1 along D
  const void* v;
  int64_t v_stride_b, v_stride_h, v_stride_t;  // v: [B, H, T, D], stride 1 along D
  void* out;                                   // out: [B, H, N, D] contiguous
  float* maps;                                 // maps: [num_map_rows, TM, N] contiguous fp32, updated in place
  const int64_t* row_of_batch;                 // row_of_batch: [B]; -1 = this batch row accumulates nothing
  const int64_t* tokens;                       // tokens: [num_map_rows, TM] contiguous, or nullptr (then TM == T)
  int64_t B, H, N, T, D, TM, num_map_rows;
  double scale;   // applied to q k^T
  double weight;  // maps += weight * mean over heads of the probabilities
};

// Largest T and D the kernel supports: the per-query probabilities (T floats) and the key/value chunk (32 x D
// floats) live in shared memory.
constexpr int64_t kCrossAttentionMaxT = 256;
constexpr int64_t kCrossAttentionMaxD = 256;

// Dynamic shared memory one block needs (at most 81 KiB, for T = D = 256).
size_t cross_attention_with_maps_smem_bytes(int64_t T, int64_t D);

cudaError_t cross_attention_with_maps_launch(const CrossAttentionWithMapsParams& p, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------------
// mask_pool. Masks [B, K, Hm, Wm] are area-downsampled to the feature grid [h, w] (P = h * w pixels):
// m[b, k, p] = mean of the (Hm/h) x (Wm/w) block, den[b, k] = sum_p m[b, k, p],
// weights[b, k, p] = m / (den + eps), 0 where den + eps == 0.

// weights: [B, K, P] fp32 contiguous (written); mass: [B, K] fp32 (written, = den / P) or nullptr.
// masks: [B, K, Hm, Wm] contiguous, dtype kFloat32/kFloat16/kBFloat16 (value), kUInt8 (value / 255) or kBool.
cudaError_t mask_pool_weights_launch(DType mask_dtype, const void* masks, float* weights, float* mass, int64_t B,
                                     int64_t K, int64_t Hm, int64_t Wm, int64_t h, int64_t w, float eps,
                                     cudaStream_t stream);

// pooled[b, k, c] = sum_p weights[b, k, p] * features[b, c, p].
// features: [B, C, h, w] with arbitrary strides (dtype = feature_dtype); weights: [B, K, P] fp32 contiguous;
// pooled: [B, K, C] contiguous, feature_dtype.
cudaError_t mask_pool_forward_launch(DType feature_dtype, const void* features, const int64_t feature_strides[4],
                                     const float* weights, void* pooled, int64_t B, int64_t K, int64_t C,
                                     int64_t h, int64_t w, cudaStream_t stream);

// grad_features[b, c, p] = sum_k weights[b, k, p] * grad_pooled[b, k, c].
// grad_pooled: [B, K, C] fp32 contiguous; weights: [B, K, P] fp32 contiguous;
// grad_features: [B, C, h, w] with the given strides (any layout without overlap), feature_dtype.
cudaError_t mask_pool_backward_launch(DType feature_dtype, const float* grad_pooled, const float* weights,
                                      void* grad_features, const int64_t grad_feature_strides[4], int64_t B,
                                      int64_t K, int64_t C, int64_t h, int64_t w, cudaStream_t stream);

}  // namespace freeatm
