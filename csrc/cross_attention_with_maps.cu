// CUDA version of freeatm_kernels.cross_attention_with_maps (DESIGN.md §3.1): cross-attention whose probabilities
// are also summed over heads into the fp32 map accumulator, without writing them to global memory.
//
// Grid: one block per (batch row b, tile of kQueryTile = 16 queries), flattened into blockIdx.x. Block: 4 warps;
// warp w owns queries 4w..4w+3 of the tile. The block walks the heads one after the other:
//   1. q rows of the tile -> shared memory (fp32).
//   2. scores: keys stream through shared memory in chunks of 32 rows; lane l scores key t0 + l against the warp's
//      4 queries (dot over D from shared memory), so each key element read from shared memory feeds 4 FMAs.
//   3. softmax of each query row (T <= 256 scores in shared memory) with warp shuffles, in the exp2 domain
//      (log2(e) folded into the scale); the probabilities are added to the block's head-sum in shared memory.
//   4. output: values stream through the same shared buffer; lane l accumulates d = l, l + 32, ... (DJ = ceil(D/32)
//      registers per query) and writes its out elements once, cast to the input dtype.
// After the last head, each map element of the tile (TM tokens x 16 queries) is updated by exactly one thread with a
// single read-modify-write: deterministic, no atomics. Two batch rows must not name the same map row (the Python
// side builds row_of_batch from distinct rows), otherwise their blocks would race.
//
// Shared memory (floats): q 16 x D, key/value chunk 32 x (D | 1) (odd row length: lanes reading 32 different rows
// at the same column hit 32 different banks), probabilities 16 x T, head-sum 16 x T: 17.5 KiB for the SD 1.5 case
// (T = 77, D = 40), 81 KiB at the limits T = D = 256 (above the 48 KiB default, so the launcher raises the limit).
//
// Index values are not validated on the host (that would synchronise with the device). As in the torch and Triton
// backends, token ids outside [0, T) are clamped into it; a batch row whose map row is outside [0, num_map_rows)
// accumulates nothing. Nothing is read or written out of bounds either way.

#include "cuda_utils.cuh"
#include "freeatm_kernels.h"

namespace freeatm {
namespace {

constexpr int kWarps = 4;
constexpr int kQueriesPerWarp = 4;  // 4 queries share every key element loaded from shared memory
constexpr int kQueryTile = kWarps * kQueriesPerWarp;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kKeyChunk = kWarpSize;  // one key per lane in the score phase
constexpr double kLog2e = 1.4426950408889634;

// Row length of the key/value chunk in shared memory: odd, so that lane l reading row l at column d touches bank
// (l * row + d) % 32, all different.
__host__ __device__ inline int chunk_row(int D) { return D | 1; }

template <typename scalar_t, int DJ>
__global__ void __launch_bounds__(kThreads)
    cross_attention_with_maps_kernel(const scalar_t* __restrict__ q, int64_t q_sb, int64_t q_sh, int64_t q_sn,
                                     const scalar_t* __restrict__ k, int64_t k_sb, int64_t k_sh, int64_t k_st,
                                     const scalar_t* __restrict__ v, int64_t v_sb, int64_t v_sh, int64_t v_st,
                                     scalar_t* __restrict__ out, float* __restrict__ maps,
                                     const int64_t* __restrict__ row_of_batch, const int64_t* __restrict__ tokens,
                                     int H, int N, int T, int D, int TM, int64_t num_map_rows, int n_tiles,
                                     float scale_log2, float map_weight) {
  extern __shared__ float smem[];
  const int DR = chunk_row(D);
  float* q_s = smem;                         // [kQueryTile][D]
  float* kv_s = q_s + kQueryTile * D;        // [kKeyChunk][DR]: keys in phase 2, values in phase 4
  float* p_s = kv_s + kKeyChunk * DR;        // [kQueryTile][T]: scores, then probabilities of the current head
  float* hs_s = p_s + kQueryTile * T;        // [kQueryTile][T]: probabilities summed over heads

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int qrow0 = (tid / kWarpSize) * kQueriesPerWarp;  // first tile row owned by this warp
  const int64_t b = blockIdx.x / n_tiles;
  const int n0 = (blockIdx.x % n_tiles) * kQueryTile;

  for (int i = tid; i < kQueryTile * T; i += kThreads) hs_s[i] = 0.f;

  for (int h = 0; h < H; ++h) {
    __syncthreads();  // the previous head is done with q_s and kv_s
    const scalar_t* qh = q + b * q_sb + h * q_sh;
    for (int i = tid; i < kQueryTile * D; i += kThreads) {
      const int qi = i / D;
      const int d = i - qi * D;
      const int n = n0 + qi;
      // rows past N score zeros: harmless, they are never written out
      q_s[i] = n < N ? to_float(qh[n * q_sn + d]) : 0.f;
    }

    // scores, in log2 units: s = (q . k) * scale * log2(e)
    const scalar_t* kh = k + b * k_sb + h * k_sh;
    for (int t0 = 0; t0 < T; t0 += kKeyChunk) {
      const int tc = min(kKeyChunk, T - t0);
      __syncthreads();  // q_s is loaded and nobody reads kv_s any more
      for (int i = tid; i < tc * D; i += kThreads) {
        const int tt = i / D;
        const int d = i - tt * D;
        kv_s[tt * DR + d] = to_float(kh[(t0 + tt) * k_st + d]);
      }
      __syncthreads();
      if (lane < tc) {
        float s[kQueriesPerWarp];
#pragma unroll
        for (int j = 0; j < kQueriesPerWarp; ++j) s[j] = 0.f;
        const float* krow = kv_s + lane * DR;
        for (int d = 0; d < D; ++d) {
          const float kd = krow[d];
#pragma unroll
          for (int j = 0; j < kQueriesPerWarp; ++j) s[j] = fmaf(q_s[(qrow0 + j) * D + d], kd, s[j]);
        }
#pragma unroll
        for (int j = 0; j < kQueriesPerWarp; ++j) p_s[(qrow0 + j) * T + t0 + lane] = s[j] * scale_log2;
      }
    }
    __syncwarp();  // the warp's score rows are complete (each row is read only by the warp that wrote it)

    // softmax per query row; lane l handles t = l, l + 32, ... (the same entries it wrote above)
#pragma unroll
    for (int j = 0; j < kQueriesPerWarp; ++j) {
      float* prow = p_s + (qrow0 + j) * T;
      float* hrow = hs_s + (qrow0 + j) * T;
      float m = -INFINITY;
      for (int t = lane; t < T; t += kWarpSize) m = fmaxf(m, prow[t]);
      m = warp_max(m);
      float sum = 0.f;
      for (int t = lane; t < T; t += kWarpSize) {
        const float e = exp2f(prow[t] - m);
        prow[t] = e;
        sum += e;
      }
      const float inv = 1.f / warp_sum(sum);  // sum >= 1: the maximum contributes exp2(0)
      for (int t = lane; t < T; t += kWarpSize) {
        const float p = prow[t] * inv;
        prow[t] = p;
        hrow[t] += p;
      }
    }
    __syncwarp();  // probabilities visible to every lane of the warp

    // out[n, d] = sum_t p[n, t] v[t, d]; lane l owns d = l + 32 jj
    float acc[kQueriesPerWarp][DJ];
#pragma unroll
    for (int j = 0; j < kQueriesPerWarp; ++j) {
#pragma unroll
      for (int jj = 0; jj < DJ; ++jj) acc[j][jj] = 0.f;
    }
    const scalar_t* vh = v + b * v_sb + h * v_sh;
    for (int t0 = 0; t0 < T; t0 += kKeyChunk) {
      const int tc = min(kKeyChunk, T - t0);
      __syncthreads();  // every warp is done with the keys / the previous value chunk
      for (int i = tid; i < tc * D; i += kThreads) {
        const int tt = i / D;
        const int d = i - tt * D;
        kv_s[tt * DR + d] = to_float(vh[(t0 + tt) * v_st + d]);
      }
      __syncthreads();
      for (int tt = 0; tt < tc; ++tt) {
        const float* vrow = kv_s + tt * DR;
        float pj[kQueriesPerWarp];
#pragma unroll
        for (int j = 0; j < kQueriesPerWarp; ++j) pj[j] = p_s[(qrow0 + j) * T + t0 + tt];
#pragma unroll
        for (int jj = 0; jj < DJ; ++jj) {
          const int d = lane + jj * kWarpSize;
          if (d < D) {
            const float vd = vrow[d];
#pragma unroll
            for (int j = 0; j < kQueriesPerWarp; ++j) acc[j][jj] = fmaf(pj[j], vd, acc[j][jj]);
          }
        }
      }
    }
    scalar_t* oh = out + (b * H + h) * static_cast<int64_t>(N) * D;
#pragma unroll
    for (int j = 0; j < kQueriesPerWarp; ++j) {
      const int n = n0 + qrow0 + j;
      if (n < N) {
#pragma unroll
        for (int jj = 0; jj < DJ; ++jj) {
          const int d = lane + jj * kWarpSize;
          if (d < D) oh[static_cast<int64_t>(n) * D + d] = from_float<scalar_t>(acc[j][jj]);
        }
      }
    }
  }

  // map update: one thread per (token, query) element of the tile, queries fastest (consecutive n: coalesced)
  const int64_t row = row_of_batch[b];  // the same for the whole block, so the early return keeps barriers uniform
  if (row < 0 || row >= num_map_rows) return;
  __syncthreads();  // head-sums were written by their own warps and are read across warps below
  float* mrow = maps + row * TM * static_cast<int64_t>(N);
  const int64_t* trow = tokens == nullptr ? nullptr : tokens + row * TM;
  for (int i = tid; i < TM * kQueryTile; i += kThreads) {
    const int tm = i / kQueryTile;
    const int qi = i - tm * kQueryTile;
    const int n = n0 + qi;
    if (n >= N) continue;
    const int64_t tok = trow == nullptr ? tm : min(max(trow[tm], int64_t{0}), static_cast<int64_t>(T - 1));
    float* dst = mrow + static_cast<int64_t>(tm) * N + n;
    *dst += map_weight * hs_s[qi * T + tok];
  }
}

template <typename scalar_t, int DJ>
cudaError_t launch_typed(const CrossAttentionWithMapsParams& p, cudaStream_t stream) {
  auto kernel = cross_attention_with_maps_kernel<scalar_t, DJ>;
  const size_t smem = cross_attention_with_maps_smem_bytes(p.T, p.D);
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const int n_tiles = static_cast<int>((p.N + kQueryTile - 1) / kQueryTile);
  const unsigned grid = static_cast<unsigned>(p.B * n_tiles);
  const float scale_log2 = static_cast<float>(p.scale * kLog2e);
  const float map_weight = static_cast<float>(p.weight / static_cast<double>(p.H));
  kernel<<<grid, kThreads, smem, stream>>>(
      static_cast<const scalar_t*>(p.q), p.q_stride_b, p.q_stride_h, p.q_stride_n, static_cast<const scalar_t*>(p.k),
      p.k_stride_b, p.k_stride_h, p.k_stride_t, static_cast<const scalar_t*>(p.v), p.v_stride_b, p.v_stride_h,
      p.v_stride_t, static_cast<scalar_t*>(p.out), p.maps, p.row_of_batch, p.tokens, static_cast<int>(p.H),
      static_cast<int>(p.N), static_cast<int>(p.T), static_cast<int>(p.D), static_cast<int>(p.TM), p.num_map_rows,
      n_tiles, scale_log2, map_weight);
  return cudaSuccess;
}

// DJ = ceil(D / 32) registers per query hold the output row: one instantiation per value so that D = 40 (SD 1.5)
// keeps 2 accumulators per query instead of 8.
template <typename scalar_t>
cudaError_t launch_for_dtype(const CrossAttentionWithMapsParams& p, cudaStream_t stream) {
  switch ((p.D + kWarpSize - 1) / kWarpSize) {
    case 1:
      return launch_typed<scalar_t, 1>(p, stream);
    case 2:
      return launch_typed<scalar_t, 2>(p, stream);
    case 3:
      return launch_typed<scalar_t, 3>(p, stream);
    case 4:
      return launch_typed<scalar_t, 4>(p, stream);
    case 5:
      return launch_typed<scalar_t, 5>(p, stream);
    case 6:
      return launch_typed<scalar_t, 6>(p, stream);
    case 7:
      return launch_typed<scalar_t, 7>(p, stream);
    case 8:
      return launch_typed<scalar_t, 8>(p, stream);
    default:
      return cudaErrorInvalidValue;  // D > 256: rejected by the binding before we get here
  }
}

}  // namespace

size_t cross_attention_with_maps_smem_bytes(int64_t T, int64_t D) {
  const int64_t floats = kQueryTile * D + kKeyChunk * chunk_row(static_cast<int>(D)) + 2 * kQueryTile * T;
  return static_cast<size_t>(floats) * sizeof(float);
}

cudaError_t cross_attention_with_maps_launch(const CrossAttentionWithMapsParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.N == 0) return cudaSuccess;  // empty output, nothing to accumulate
  switch (p.dtype) {
    case DType::kFloat32:
      return launch_for_dtype<float>(p, stream);
    case DType::kFloat16:
      return launch_for_dtype<__half>(p, stream);
    case DType::kBFloat16:
      return launch_for_dtype<__nv_bfloat16>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace freeatm
