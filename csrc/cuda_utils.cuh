// Device helpers shared by the kernels of freeatm_kernels._C: dtype conversion and warp/block reductions.
//
// Torch builds its extensions with -D__CUDA_NO_HALF_CONVERSIONS__ (and the bf16 twin), so half/bf16 values are
// converted with the explicit intrinsics below rather than implicit casts. Every kernel loads its inputs through
// to_float, computes in fp32 and converts once on store with from_float.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace freeatm {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
// uint8 masks hold 0..255 and bool masks 0/1 (torch stores bool as one byte); the caller applies the scale.
template <>
__device__ __forceinline__ float to_float<uint8_t>(uint8_t x) {
  return static_cast<float>(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Butterfly reductions: every lane ends with the same value, computed in the same order on every run.
// All 32 lanes of the warp must call them.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullWarp, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullWarp, v, offset));
  return v;
}

// Sum of `v` over the whole block, returned to every thread. `scratch` holds at least blockDim.x / 32 floats of
// shared memory and must not be reused by the caller afterwards (no trailing barrier). Deterministic: a fixed
// butterfly inside each warp, then every thread adds the warp partials in warp order.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  const int num_warps = blockDim.x / kWarpSize;
  for (int i = 0; i < num_warps; ++i) total += scratch[i];
  return total;
}

}  // namespace freeatm
