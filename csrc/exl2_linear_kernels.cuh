// Device code of the EXL2 linear (csrc/exl2_linear.cu is its torch wrapper). No torch header here,
// so that `nvcc -c` can check this file on a machine whose torch lacks the CUDA headers.
//
// The packed tensors are read as the file stores them (docs/format.md), with no load-time
// reshuffle: q_weight is a little-endian bit stream down each column, so 32 rows of a b-bit group
// are exactly b consecutive 32-bit words of that column, whatever b is (8, 6, 5, 4, 3, 2). Every
// group but the last spans a multiple of 32 rows, so the unit of work here is such a 32-row
// "chunk": one bit width, one group (one scale per column), b words per column. A chunk map,
// int32 [chunks, 4] = (first packed row, bits, group, rows), is derived once from q_groups on the
// host (exl2conv/pack.py, chunk_map), as ExLlamaV2 derives its q_group_map at load.
//
// Rows are in the permuted (act-order) order: packed row j holds the model's row perm[j].
// exl2_dequant writes row j to output row perm[j]; exl2_gemv instead gathers x through perm while
// loading it into shared memory, so the weights are read once, in stored order.
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

namespace exl2 {

constexpr int CHUNK = 32;          // rows per chunk
constexpr int WARPS = 8;           // warps per block
constexpr int THREADS = WARPS * 32;
constexpr int COLS = 4;            // columns per thread: one 16-byte load of q_weight per word row
constexpr int TILE = 32 * COLS;    // columns per warp and per block
constexpr int MAX_CHUNKS_PER_SPLIT = 32;  // the gemv's shared-memory slice of x: 1024 rows
constexpr int MAX_BATCH = 8;

struct ChunkInfo
{
    int qrow, bits, group, rows;
};

__device__ __forceinline__ ChunkInfo load_chunk(const int* __restrict__ map, int c)
{
    const int4 v = reinterpret_cast<const int4*>(map)[c];
    return {v.x, v.y, v.z, v.w};
}

// The fp16 scales of 4 adjacent columns n0..n0+3 (n0 a multiple of 4) of group g, computed as the
// runtime computes them: fp16( fp16(qs^2) * fp16(q_scale_max / 256) ), qs = stored nibble + 1.
// A product of two fp16 values is exact in float32, so one rounding to fp16 gives the IEEE half
// product (exl2conv/pack.py, dequant_scale).
__device__ __forceinline__ void group_scales(const uint32_t* __restrict__ q_scale, const __half* __restrict__ q_scale_max,
                                             int g, int n0, int N, bool live, float s[COLS])
{
    const uint32_t word = live ? q_scale[(size_t)g * (N / 8) + n0 / 8] : 0u;
    const float ms = __half2float(__float2half_rn(__half2float(q_scale_max[g]) * 0.00390625f));
    const int base = (n0 & 4) * 4;  // this thread's 4 nibbles: the low or the high half of the word
    #pragma unroll
    for (int c = 0; c < COLS; c++)
    {
        const int qs = (int) ((word >> (base + 4 * c)) & 15u) + 1;
        s[c] = __half2float(__float2half_rn(__fmul_rn((float) (qs * qs), ms)));
    }
}

// The chunk's words of 4 columns: word j of the chunk at q_weight row qrow + j. A partial last
// chunk has rows*BITS/32 words; the rest read as zero (their rows are masked by the callers).
// Threads whose columns lie past N (live false) read nothing.
template <int BITS>
__device__ __forceinline__ void load_words(const uint32_t* __restrict__ q_weight, int N, int n0, bool live,
                                           const ChunkInfo& ch, uint4 w[BITS])
{
    const int nwords = live ? ch.rows * BITS / CHUNK : 0;
    #pragma unroll
    for (int j = 0; j < BITS; j++)
        w[j] = j < nwords ? __ldg(reinterpret_cast<const uint4*>(q_weight + (size_t)(ch.qrow + j) * N + n0))
                          : make_uint4(0, 0, 0, 0);
}

__device__ __forceinline__ uint32_t lane_word(const uint4& w, int c)
{
    return c == 0 ? w.x : c == 1 ? w.y : c == 2 ? w.z : w.w;
}

// Code of row i (0..31, a compile-time constant after unrolling) of one column: stream bits
// [i*BITS, i*BITS + BITS); a code that straddles two words is joined with a funnel shift.
template <int BITS>
__device__ __forceinline__ uint32_t code_at(const uint4 w[BITS], int c, int i)
{
    const int bit = i * BITS, j = bit / 32, off = bit % 32;
    uint32_t v;
    if (off + BITS <= 32) v = lane_word(w[j], c) >> off;
    else v = __funnelshift_r(lane_word(w[j], c), lane_word(w[j + 1], c), off);
    return v & ((1u << BITS) - 1u);
}

// (code - zero) as a float without an int-to-float conversion (a slow instruction): the code's
// bits under the exponent of 2^23 make the float 2^23 + code, and one subtraction of the exact
// 2^23 + zero leaves code - zero exactly.
__device__ __forceinline__ float centered(uint32_t code, float magic_zero)
{
    return __fsub_rn(__uint_as_float(0x4B000000u | code), magic_zero);
}

// ---- dequantize: W^T [K, N] fp16 in the model's row order -----------------------------------------

// One warp per chunk, 4 columns per thread; block (column tile, 8 chunks). Each value is
// fp16( fp16(code - zero) * scale ): code - zero (|.| <= 128) and the fp16 scale multiply exactly
// in float32, so one rounding gives the half product the runtime's reconstruct computes.
template <int BITS>
__device__ __forceinline__ void dequant_chunk(const uint32_t* __restrict__ q_weight, const uint32_t* __restrict__ q_scale,
                                              const __half* __restrict__ q_scale_max, const int* __restrict__ perm,
                                              const ChunkInfo& ch, int row0, int N, int n0, bool live,
                                              __half* __restrict__ out)
{
    uint4 w[BITS];
    load_words<BITS>(q_weight, N, n0, live, ch, w);
    float s[COLS];
    group_scales(q_scale, q_scale_max, ch.group, n0, N, live, s);
    const float magic_zero = 8388608.0f + (float) (1 << (BITS - 1));
    const int lane = threadIdx.x & 31;
    const int my_dest = lane < ch.rows ? perm[row0 + lane] : 0;  // lane i holds row i's destination
    #pragma unroll
    for (int i = 0; i < CHUNK; i++)
    {
        const int dest = __shfl_sync(0xffffffffu, my_dest, i);
        if (i >= ch.rows) break;  // warp-uniform: only a partial last chunk stops early
        if (!live) continue;      // after the shuffle, which needs the whole warp
        __half h[COLS];
        #pragma unroll
        for (int c = 0; c < COLS; c++) h[c] = __float2half_rn(__fmul_rn(centered(code_at<BITS>(w, c, i), magic_zero), s[c]));
        uint2 packed;
        packed.x = (uint32_t) __half_as_ushort(h[0]) | ((uint32_t) __half_as_ushort(h[1]) << 16);
        packed.y = (uint32_t) __half_as_ushort(h[2]) | ((uint32_t) __half_as_ushort(h[3]) << 16);
        *reinterpret_cast<uint2*>(out + (size_t)dest * N + n0) = packed;
    }
}

__global__ void __launch_bounds__(THREADS)
dequant_kernel(const uint32_t* __restrict__ q_weight, const uint32_t* __restrict__ q_scale,
               const __half* __restrict__ q_scale_max, const int* __restrict__ perm, const int* __restrict__ map,
               int chunks, int N, __half* __restrict__ out)
{
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    const int c = blockIdx.y * WARPS + warp;
    const int n0 = blockIdx.x * TILE + lane * COLS;
    if (c >= chunks) return;  // the whole warp: the chunk's shuffles run on full warps only
    const ChunkInfo ch = load_chunk(map, c);
    // a warp's last lanes may lie past N (a multiple of 32, not of the 128-column tile): they
    // take part in the shuffles and load and store nothing
    const bool live = n0 < N;
    switch (ch.bits)
    {
        case 8: dequant_chunk<8>(q_weight, q_scale, q_scale_max, perm, ch, c * CHUNK, N, n0, live, out); break;
        case 6: dequant_chunk<6>(q_weight, q_scale, q_scale_max, perm, ch, c * CHUNK, N, n0, live, out); break;
        case 5: dequant_chunk<5>(q_weight, q_scale, q_scale_max, perm, ch, c * CHUNK, N, n0, live, out); break;
        case 4: dequant_chunk<4>(q_weight, q_scale, q_scale_max, perm, ch, c * CHUNK, N, n0, live, out); break;
        case 3: dequant_chunk<3>(q_weight, q_scale, q_scale_max, perm, ch, c * CHUNK, N, n0, live, out); break;
        case 2: dequant_chunk<2>(q_weight, q_scale, q_scale_max, perm, ch, c * CHUNK, N, n0, live, out); break;
        default: break;  // the host validated the bit widths
    }
}

__device__ __forceinline__ void prefetch_l2(const void* p)
{
    asm volatile("prefetch.global.L2 [%0];" : : "l"(p));
}

// ---- gemv: y [B, N] = x [B, K] @ W^T, B <= 8 ------------------------------------------------------
//
// Block (column tile of 128, K split): its slice of x, gathered through perm, sits in shared memory
// as float32; its 8 warps take the slice's chunks in turn, each thread 4 columns, and add
// x * (code - zero) over a chunk's 32 rows in float32 before one multiply by the column's scale
// (one scale per chunk and column). The warps' sums are added in shared memory in a fixed order.
// With several K splits, each block writes its float32 partial sums to a workspace and the last
// block of a column tile to finish (an atomic counter) adds the splits in order and writes fp16:
// one launch, deterministic, no fp16 rounding between splits.

template <int B, int BITS>
__device__ __forceinline__ void gemv_chunk(const uint32_t* __restrict__ q_weight, const uint32_t* __restrict__ q_scale,
                                           const __half* __restrict__ q_scale_max, const ChunkInfo& ch, int N, int n0,
                                           bool live, const float* xs, int xstride, float acc[B][COLS])
{
    uint4 w[BITS];
    load_words<BITS>(q_weight, N, n0, live, ch, w);
    float s[COLS];
    group_scales(q_scale, q_scale_max, ch.group, n0, N, live, s);
    const float magic_zero = 8388608.0f + (float) (1 << (BITS - 1));
    float part[B][COLS];
    #pragma unroll
    for (int b = 0; b < B; b++)
        #pragma unroll
        for (int c = 0; c < COLS; c++) part[b][c] = 0.0f;
    // rows past a partial chunk's end hold x = 0 in shared memory and words of zero: they add 0
    #pragma unroll
    for (int i4 = 0; i4 < CHUNK; i4 += 4)
    {
        float4 xv[B];
        #pragma unroll
        for (int b = 0; b < B; b++) xv[b] = *reinterpret_cast<const float4*>(xs + b * xstride + i4);
        #pragma unroll
        for (int k = 0; k < 4; k++)
        {
            #pragma unroll
            for (int c = 0; c < COLS; c++)
            {
                const float q = centered(code_at<BITS>(w, c, i4 + k), magic_zero);
                #pragma unroll
                for (int b = 0; b < B; b++)
                {
                    const float xk = k == 0 ? xv[b].x : k == 1 ? xv[b].y : k == 2 ? xv[b].z : xv[b].w;
                    part[b][c] = fmaf(xk, q, part[b][c]);
                }
            }
        }
    }
    #pragma unroll
    for (int b = 0; b < B; b++)
        #pragma unroll
        for (int c = 0; c < COLS; c++) acc[b][c] = fmaf(part[b][c], s[c], acc[b][c]);
}

template <int B>
__device__ __forceinline__ void gemv_dispatch(const uint32_t* __restrict__ q_weight, const uint32_t* __restrict__ q_scale,
                                              const __half* __restrict__ q_scale_max, const ChunkInfo& ch, int N,
                                              int n0, bool live, const float* xs, int xstride, float acc[B][COLS])
{
    switch (ch.bits)
    {
        case 8: gemv_chunk<B, 8>(q_weight, q_scale, q_scale_max, ch, N, n0, live, xs, xstride, acc); break;
        case 6: gemv_chunk<B, 6>(q_weight, q_scale, q_scale_max, ch, N, n0, live, xs, xstride, acc); break;
        case 5: gemv_chunk<B, 5>(q_weight, q_scale, q_scale_max, ch, N, n0, live, xs, xstride, acc); break;
        case 4: gemv_chunk<B, 4>(q_weight, q_scale, q_scale_max, ch, N, n0, live, xs, xstride, acc); break;
        case 3: gemv_chunk<B, 3>(q_weight, q_scale, q_scale_max, ch, N, n0, live, xs, xstride, acc); break;
        case 2: gemv_chunk<B, 2>(q_weight, q_scale, q_scale_max, ch, N, n0, live, xs, xstride, acc); break;
        default: break;
    }
}

// x: fp16 [B, K]; y: fp16 [B, N]; partial: float32 [splits, B, N] (unused with one split);
// counters: int32 [column tiles], zero at launch and left at zero (the last block of a tile resets
// its counter), so that the host can keep one buffer per stream instead of clearing one per call.
// Blocks per SM the register budget must allow: 2 for many rows (the 8-row kernel then fits 128
// registers without spilling; unbounded it took 154, one block of 8 warps per SM, too few loads in
// flight to cover the memory latency), 3 for 2 rows (80 registers), 4 for one row (64 registers;
// with a bound of 2 blocks the 1-row kernel grew to 104 registers for nothing). None spills
// (checked with -Xptxas -v for sm_90; 3 rows spill under a bound of 3).
template <int B>
__global__ void __launch_bounds__(THREADS, B == 1 ? 4 : B == 2 ? 3 : 2)
gemv_kernel(const __half* __restrict__ x, const uint32_t* __restrict__ q_weight, const uint32_t* __restrict__ q_scale,
            const __half* __restrict__ q_scale_max, const int* __restrict__ perm, const int* __restrict__ map,
            int K, int N, int chunks, int chunks_per_split, float* __restrict__ partial, int* __restrict__ counters,
            __half* __restrict__ y)
{
    constexpr int SLICE = MAX_CHUNKS_PER_SPLIT * CHUNK;
    __shared__ __align__(16) float xs[B][SLICE];
    __shared__ float red[WARPS][TILE];
    __shared__ int is_last;
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    const int split = blockIdx.y, splits = gridDim.y;
    const int c0 = split * chunks_per_split;
    const int c1 = min(chunks, c0 + chunks_per_split);
    const int row0 = c0 * CHUNK, rows = (c1 - c0) * CHUNK;

    const int n0 = blockIdx.x * TILE + lane * COLS;
    const bool live = n0 < N;
    // start this warp's weights on their way to L2 now: the gather of x below waits on two
    // dependent loads (perm, then x), which would otherwise come before any weight is requested
    if (live)
        for (int c = c0 + warp; c < c1; c += WARPS)
        {
            const ChunkInfo ch = load_chunk(map, c);
            for (int j = 0; j < ch.rows * ch.bits / CHUNK; j++)
                prefetch_l2(q_weight + (size_t)(ch.qrow + j) * N + n0);
        }

    // the slice of x in stored row order: x_perm[j] = x[perm[j]]; rows past K read as zero
    for (int t = threadIdx.x; t < B * rows; t += THREADS)
    {
        const int b = t / rows, r = t % rows, j = row0 + r;
        xs[b][r] = j < K ? __half2float(x[(size_t)b * K + perm[j]]) : 0.0f;
    }
    __syncthreads();

    float acc[B][COLS];
    #pragma unroll
    for (int b = 0; b < B; b++)
        #pragma unroll
        for (int c = 0; c < COLS; c++) acc[b][c] = 0.0f;
    for (int c = c0 + warp; c < c1; c += WARPS)
    {
        const ChunkInfo ch = load_chunk(map, c);
        gemv_dispatch<B>(q_weight, q_scale, q_scale_max, ch, N, n0, live, &xs[0][(c - c0) * CHUNK], SLICE, acc);
    }

    // the warps' sums, added in warp order; thread t < TILE then owns column tile*TILE + t
    const int col = blockIdx.x * TILE + threadIdx.x;
    float sum[B];
    #pragma unroll
    for (int b = 0; b < B; b++)
    {
        #pragma unroll
        for (int c = 0; c < COLS; c++) red[warp][lane * COLS + c] = acc[b][c];
        __syncthreads();
        sum[b] = 0.0f;
        if (threadIdx.x < TILE)
            #pragma unroll
            for (int w = 0; w < WARPS; w++) sum[b] += red[w][threadIdx.x];
        __syncthreads();
    }
    const bool mine = threadIdx.x < TILE && col < N;
    if (splits == 1)
    {
        if (mine)
            #pragma unroll
            for (int b = 0; b < B; b++) y[(size_t)b * N + col] = __float2half_rn(sum[b]);
        return;
    }
    if (mine)
        #pragma unroll
        for (int b = 0; b < B; b++) partial[((size_t)split * B + b) * N + col] = sum[b];
    // publish the partial sums before counting this block as done (threadFenceReduction pattern)
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(&counters[blockIdx.x], 1) == splits - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    if (mine)
    {
        #pragma unroll
        for (int b = 0; b < B; b++)
        {
            float total = 0.0f;
            // __ldcg: through L2 only, where the other blocks' writes are visible
            for (int s = 0; s < splits; s++) total += __ldcg(partial + ((size_t)s * B + b) * N + col);
            y[(size_t)b * N + col] = __float2half_rn(total);
        }
    }
    if (threadIdx.x == 0) counters[blockIdx.x] = 0;
}

}  // namespace exl2
