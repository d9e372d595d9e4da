// CUDA version of freeatm_kernels.mask_pool (DESIGN.md §3.2): masked average pooling of a feature map, with the
// masks area-downsampled to the feature grid inside the kernels.
//
// Three kernels, each output element written by exactly one thread (deterministic, no atomics):
//   mask_pool_weights_kernel  one block per (b, k): downsample the mask to P = h * w pixels, den = sum_p m (fixed-order
//                             block reduction), weights = m / (den + eps) (0 where den + eps == 0) into an fp32
//                             workspace [B, K, P], mass = den / P. The workspace is P floats per mask, (Hm/h)(Wm/w)
//                             times smaller than the mask itself, so the pooling kernels below re-read it instead of
//                             the full-resolution masks.
//   mask_pool_forward_kernel  one block per (b, 8 masks, 32 channels): pooled = weights @ features^T over P, with
//                             64-pixel chunks of both staged in shared memory.
//   mask_pool_backward_kernel one block per (b, 32 x 8 tile of (channel, pixel)): grad_f = weights^T @ grad_pooled over
//                             K, with 32-mask chunks staged in shared memory.
// The backward recomputes the weights from the masks (cheap: one pass over the masks) rather than saving them.
// Tiles put the 32-wide side along whichever of channel / pixel has unit stride in global memory, so loads and
// stores of channels_last tensors are as coalesced as those of contiguous ones.

#include "cuda_utils.cuh"
#include "freeatm_kernels.h"

namespace freeatm {
namespace {

// --- weights ------------------------------------------------------------------------------------------------------
constexpr int kWeightsThreads = 256;
constexpr int kWeightsWarps = kWeightsThreads / kWarpSize;
// Below this many mask values per pixel, one thread sums a pixel's block; from it up, a warp does (lanes read
// consecutive values), so a 32 x 32 block per pixel (224 px masks on a 7 x 7 feature map) costs 32 loads per lane,
// not 1024 dependent loads on one thread.
constexpr int kWarpPerPixelMinPatch = 32;

template <typename mask_t>
__global__ void __launch_bounds__(kWeightsThreads)
    mask_pool_weights_kernel(const mask_t* __restrict__ masks,  // [B*K, Hm, Wm] contiguous
                             float* __restrict__ weights,       // [B*K, P] contiguous
                             float* __restrict__ mass,          // [B*K] or nullptr
                             int Hm, int Wm, int h, int w, float value_scale, float eps) {
  extern __shared__ float smem[];  // [kWeightsWarps]: block reduction scratch
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int64_t bk = blockIdx.x;
  const int P = h * w;
  const int sh = Hm / h;
  const int sw = Wm / w;
  const int patch = sh * sw;
  const bool warp_per_pixel = patch >= kWarpPerPixelMinPatch;
  const mask_t* mk = masks + bk * Hm * static_cast<int64_t>(Wm);
  float* wk = weights + bk * P;

  // m = mean of the pixel's sh x sw block; the thread (or lane 0 of the warp) that owns pixel p stores m there and
  // adds it to its partial sum of den
  float local = 0.f;
  if (!warp_per_pixel) {
    for (int p = tid; p < P; p += kWeightsThreads) {
      const int ph = p / w;
      const int pw = p - ph * w;
      const mask_t* src = mk + static_cast<int64_t>(ph * sh) * Wm + pw * sw;
      float s = 0.f;
      for (int i = 0; i < sh; ++i) {
        for (int j = 0; j < sw; ++j) s += to_float(src[static_cast<int64_t>(i) * Wm + j]);
      }
      const float m = s * value_scale;
      wk[p] = m;
      local += m;
    }
  } else {
    for (int p = warp; p < P; p += kWeightsWarps) {  // warp-uniform loop: every lane reaches the shuffles
      const int ph = p / w;
      const int pw = p - ph * w;
      const mask_t* src = mk + static_cast<int64_t>(ph * sh) * Wm + pw * sw;
      float s = 0.f;
      for (int e = lane; e < patch; e += kWarpSize) {
        const int i = e / sw;
        const int j = e - i * sw;
        s += to_float(src[static_cast<int64_t>(i) * Wm + j]);
      }
      s = warp_sum(s);
      if (lane == 0) {
        const float m = s * value_scale;
        wk[p] = m;
        local += m;
      }
    }
  }

  const float den = block_sum(local, smem);
  const float denom = den + eps;
  const float inv = denom != 0.f ? 1.f / denom : 0.f;  // den + eps == 0 pools to 0, never NaN
  // rescale with the same pixel -> thread mapping, so each thread re-reads only what it wrote itself
  if (!warp_per_pixel) {
    for (int p = tid; p < P; p += kWeightsThreads) wk[p] *= inv;
  } else if (lane == 0) {
    for (int p = warp; p < P; p += kWeightsWarps) wk[p] *= inv;
  }
  if (mass != nullptr && tid == 0) mass[bk] = den / static_cast<float>(P);
}

// --- forward ------------------------------------------------------------------------------------------------------
constexpr int kPoolThreads = 256;
constexpr int kPoolChannels = 32;  // channels per block = lanes of a warp
constexpr int kPoolMasks = kPoolThreads / kPoolChannels;  // 8 masks per block: thread (kk, cc) owns one output
constexpr int kPoolPixels = 64;   // pixels per shared-memory chunk: 32 x 65 + 8 x 64 floats = 10.1 KiB

template <typename scalar_t>
__global__ void __launch_bounds__(kPoolThreads)
    mask_pool_forward_kernel(const scalar_t* __restrict__ features, int64_t f_sb, int64_t f_sc, int64_t f_sh,
                             int64_t f_sw,                      // [B, C, h, w]
                             const float* __restrict__ weights,  // [B, K, P] contiguous
                             scalar_t* __restrict__ pooled,      // [B, K, C] contiguous
                             int K, int C, int h, int w, int c_tiles, int k_tiles, bool channels_fastest) {
  extern __shared__ float smem[];
  float* f_s = smem;                                    // [kPoolChannels][kPoolPixels + 1]
  float* w_s = f_s + kPoolChannels * (kPoolPixels + 1);  // [kPoolMasks][kPoolPixels]
  constexpr int FR = kPoolPixels + 1;  // odd row: lanes reading 32 channels at one pixel hit 32 banks

  const int tid = threadIdx.x;
  const int cc = tid % kPoolChannels;
  const int kk = tid / kPoolChannels;
  const int c_tile = blockIdx.x % c_tiles;
  const int64_t rest = blockIdx.x / c_tiles;
  const int k_tile = static_cast<int>(rest % k_tiles);
  const int64_t b = rest / k_tiles;
  const int c0 = c_tile * kPoolChannels;
  const int k0 = k_tile * kPoolMasks;
  const int P = h * w;
  const scalar_t* fb = features + b * f_sb;
  const float* wb = weights + b * K * static_cast<int64_t>(P);

  float acc = 0.f;
  for (int p0 = 0; p0 < P; p0 += kPoolPixels) {
    const int pc = min(kPoolPixels, P - p0);
    __syncthreads();  // everyone is done with the previous chunk
    for (int i = tid; i < kPoolChannels * kPoolPixels; i += kPoolThreads) {
      // consecutive threads walk the dimension with unit stride in memory
      const int c_l = channels_fastest ? i % kPoolChannels : i / kPoolPixels;
      const int p_l = channels_fastest ? i / kPoolChannels : i % kPoolPixels;
      const int c = c0 + c_l;
      float val = 0.f;
      if (c < C && p_l < pc) {
        const int p = p0 + p_l;
        const int ph = p / w;
        const int pw = p - ph * w;
        val = to_float(fb[c * f_sc + ph * f_sh + pw * f_sw]);
      }
      f_s[c_l * FR + p_l] = val;
    }
    for (int i = tid; i < kPoolMasks * kPoolPixels; i += kPoolThreads) {
      const int k_l = i / kPoolPixels;
      const int p_l = i % kPoolPixels;
      const int k = k0 + k_l;
      w_s[i] = (k < K && p_l < pc) ? wb[static_cast<int64_t>(k) * P + p0 + p_l] : 0.f;
    }
    __syncthreads();
    const float* frow = f_s + cc * FR;
    const float* wrow = w_s + kk * kPoolPixels;
    for (int p_l = 0; p_l < pc; ++p_l) acc = fmaf(wrow[p_l], frow[p_l], acc);
  }
  const int k = k0 + kk;
  const int c = c0 + cc;
  if (k < K && c < C) pooled[(b * K + k) * C + c] = from_float<scalar_t>(acc);
}

// --- backward -----------------------------------------------------------------------------------------------------
constexpr int kGradThreads = 256;
constexpr int kGradFast = 32;                        // tile side along the unit-stride dimension (a warp)
constexpr int kGradSlow = kGradThreads / kGradFast;  // 8
constexpr int kGradMasks = 32;                       // masks per shared-memory chunk: 2 x 32 x 32 floats = 8 KiB

template <typename scalar_t>
__global__ void __launch_bounds__(kGradThreads)
    mask_pool_backward_kernel(const float* __restrict__ grad_pooled,  // [B, K, C] contiguous
                              const float* __restrict__ weights,      // [B, K, P] contiguous
                              scalar_t* __restrict__ grad_features, int64_t g_sb, int64_t g_sc, int64_t g_sh,
                              int64_t g_sw,  // [B, C, h, w]
                              int K, int C, int h, int w, int p_tiles, int c_tiles, bool channels_fastest) {
  extern __shared__ float smem[];
  float* g_s = smem;                          // [kGradMasks][kGradFast]: grad_pooled of the tile's channels
  float* w_s = g_s + kGradMasks * kGradFast;  // [kGradMasks][kGradFast]: weights of the tile's pixels

  // tile: CT channels x PT pixels, 32 along the unit-stride dimension and 8 along the other
  const int CT = channels_fastest ? kGradFast : kGradSlow;
  const int PT = channels_fastest ? kGradSlow : kGradFast;
  const int tid = threadIdx.x;
  const int cc = channels_fastest ? tid % kGradFast : tid / kGradFast;
  const int pp = channels_fastest ? tid / kGradFast : tid % kGradFast;
  const int p_tile = blockIdx.x % p_tiles;
  const int64_t rest = blockIdx.x / p_tiles;
  const int c_tile = static_cast<int>(rest % c_tiles);
  const int64_t b = rest / c_tiles;
  const int c0 = c_tile * CT;
  const int p0 = p_tile * PT;
  const int P = h * w;
  const float* gb = grad_pooled + b * K * static_cast<int64_t>(C);
  const float* wb = weights + b * K * static_cast<int64_t>(P);

  float acc = 0.f;
  for (int kb = 0; kb < K; kb += kGradMasks) {
    const int kc = min(kGradMasks, K - kb);
    __syncthreads();  // everyone is done with the previous chunk
    for (int i = tid; i < kGradMasks * CT; i += kGradThreads) {
      const int k_l = i / CT;
      const int c_l = i - k_l * CT;
      const int c = c0 + c_l;
      g_s[k_l * kGradFast + c_l] = (k_l < kc && c < C) ? gb[static_cast<int64_t>(kb + k_l) * C + c] : 0.f;
    }
    for (int i = tid; i < kGradMasks * PT; i += kGradThreads) {
      const int k_l = i / PT;
      const int p_l = i - k_l * PT;
      const int p = p0 + p_l;
      w_s[k_l * kGradFast + p_l] = (k_l < kc && p < P) ? wb[static_cast<int64_t>(kb + k_l) * P + p] : 0.f;
    }
    __syncthreads();
    for (int k_l = 0; k_l < kc; ++k_l) acc = fmaf(w_s[k_l * kGradFast + pp], g_s[k_l * kGradFast + cc], acc);
  }
  const int c = c0 + cc;
  const int p = p0 + pp;
  if (c < C && p < P) {
    const int ph = p / w;
    const int pw = p - ph * w;
    grad_features[b * g_sb + c * g_sc + ph * g_sh + pw * g_sw] = from_float<scalar_t>(acc);
  }
}

template <typename mask_t>
void launch_weights(const void* masks, float* weights, float* mass, int64_t BK, int64_t Hm, int64_t Wm, int64_t h,
                    int64_t w, float value_scale, float eps, cudaStream_t stream) {
  const size_t smem = kWeightsWarps * sizeof(float);
  auto kernel = mask_pool_weights_kernel<mask_t>;
  kernel<<<static_cast<unsigned>(BK), kWeightsThreads, smem, stream>>>(
      static_cast<const mask_t*>(masks), weights, mass, static_cast<int>(Hm), static_cast<int>(Wm),
      static_cast<int>(h), static_cast<int>(w), value_scale, eps);
}

template <typename scalar_t>
void launch_forward(const void* features, const int64_t* fs, const float* weights, void* pooled, int64_t B, int64_t K,
                    int64_t C, int64_t h, int64_t w, cudaStream_t stream) {
  const int c_tiles = static_cast<int>((C + kPoolChannels - 1) / kPoolChannels);
  const int k_tiles = static_cast<int>((K + kPoolMasks - 1) / kPoolMasks);
  const unsigned grid = static_cast<unsigned>(B * c_tiles * k_tiles);
  const size_t smem = (kPoolChannels * (kPoolPixels + 1) + kPoolMasks * kPoolPixels) * sizeof(float);
  const bool channels_fastest = fs[1] == 1;
  auto kernel = mask_pool_forward_kernel<scalar_t>;
  kernel<<<grid, kPoolThreads, smem, stream>>>(static_cast<const scalar_t*>(features), fs[0], fs[1], fs[2], fs[3],
                                               weights, static_cast<scalar_t*>(pooled), static_cast<int>(K),
                                               static_cast<int>(C), static_cast<int>(h), static_cast<int>(w), c_tiles,
                                               k_tiles, channels_fastest);
}

template <typename scalar_t>
void launch_backward(const float* grad_pooled, const float* weights, void* grad_features, const int64_t* gs, int64_t B,
                     int64_t K, int64_t C, int64_t h, int64_t w, cudaStream_t stream) {
  const bool channels_fastest = gs[1] == 1;
  const int64_t CT = channels_fastest ? kGradFast : kGradSlow;
  const int64_t PT = channels_fastest ? kGradSlow : kGradFast;
  const int p_tiles = static_cast<int>((h * w + PT - 1) / PT);
  const int c_tiles = static_cast<int>((C + CT - 1) / CT);
  const unsigned grid = static_cast<unsigned>(B * p_tiles * c_tiles);
  const size_t smem = 2 * kGradMasks * kGradFast * sizeof(float);
  auto kernel = mask_pool_backward_kernel<scalar_t>;
  kernel<<<grid, kGradThreads, smem, stream>>>(grad_pooled, weights, static_cast<scalar_t*>(grad_features), gs[0],
                                               gs[1], gs[2], gs[3], static_cast<int>(K), static_cast<int>(C),
                                               static_cast<int>(h), static_cast<int>(w), p_tiles, c_tiles,
                                               channels_fastest);
}

}  // namespace

cudaError_t mask_pool_weights_launch(DType mask_dtype, const void* masks, float* weights, float* mass, int64_t B,
                                     int64_t K, int64_t Hm, int64_t Wm, int64_t h, int64_t w, float eps,
                                     cudaStream_t stream) {
  if (B * K == 0) return cudaSuccess;
  const double patch = static_cast<double>((Hm / h) * (Wm / w));
  switch (mask_dtype) {
    case DType::kFloat32:
      launch_weights<float>(masks, weights, mass, B * K, Hm, Wm, h, w, static_cast<float>(1.0 / patch), eps, stream);
      return cudaSuccess;
    case DType::kFloat16:
      launch_weights<__half>(masks, weights, mass, B * K, Hm, Wm, h, w, static_cast<float>(1.0 / patch), eps, stream);
      return cudaSuccess;
    case DType::kBFloat16:
      launch_weights<__nv_bfloat16>(masks, weights, mass, B * K, Hm, Wm, h, w, static_cast<float>(1.0 / patch), eps,
                                    stream);
      return cudaSuccess;
    case DType::kUInt8:  // value / 255
      launch_weights<uint8_t>(masks, weights, mass, B * K, Hm, Wm, h, w, static_cast<float>(1.0 / (255.0 * patch)),
                              eps, stream);
      return cudaSuccess;
    case DType::kBool:  // stored as one byte holding 0 or 1
      launch_weights<uint8_t>(masks, weights, mass, B * K, Hm, Wm, h, w, static_cast<float>(1.0 / patch), eps,
                              stream);
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t mask_pool_forward_launch(DType feature_dtype, const void* features, const int64_t feature_strides[4],
                                     const float* weights, void* pooled, int64_t B, int64_t K, int64_t C, int64_t h,
                                     int64_t w, cudaStream_t stream) {
  if (B * K * C == 0) return cudaSuccess;
  switch (feature_dtype) {
    case DType::kFloat32:
      launch_forward<float>(features, feature_strides, weights, pooled, B, K, C, h, w, stream);
      return cudaSuccess;
    case DType::kFloat16:
      launch_forward<__half>(features, feature_strides, weights, pooled, B, K, C, h, w, stream);
      return cudaSuccess;
    case DType::kBFloat16:
      launch_forward<__nv_bfloat16>(features, feature_strides, weights, pooled, B, K, C, h, w, stream);
      return cudaSuccess;
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t mask_pool_backward_launch(DType feature_dtype, const float* grad_pooled, const float* weights,
                                      void* grad_features, const int64_t grad_feature_strides[4], int64_t B, int64_t K,
                                      int64_t C, int64_t h, int64_t w, cudaStream_t stream) {
  if (B * C * h * w == 0) return cudaSuccess;
  switch (feature_dtype) {
    case DType::kFloat32:
      launch_backward<float>(grad_pooled, weights, grad_features, grad_feature_strides, B, K, C, h, w, stream);
      return cudaSuccess;
    case DType::kFloat16:
      launch_backward<__half>(grad_pooled, weights, grad_features, grad_feature_strides, B, K, C, h, w, stream);
      return cudaSuccess;
    case DType::kBFloat16:
      launch_backward<__nv_bfloat16>(grad_pooled, weights, grad_features, grad_feature_strides, B, K, C, h, w,
                                     stream);
      return cudaSuccess;
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace freeatm
