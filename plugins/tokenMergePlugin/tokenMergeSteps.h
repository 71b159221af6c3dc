/*
 * The TokenMerge algorithm as "block programs" shared by the CUDA kernels and the CPU executor.
 *
 * Each kernel is written once, as a function template over an executor `Exec`:
 *
 *     ex.each([&](int tid, State& state) { ...one thread's work for this phase... });
 *
 * On the GPU (tokenMergeKernel.cu) `each` is "__syncthreads(); run the lambda for this thread".
 * On the CPU (tokenMergeHost.cpp) `each` runs the lambda for tid = 0 .. kBlockThreads-1 in turn.
 * Phases are separated by a barrier in both cases, and within a phase a thread reads shared
 * memory written in earlier phases or by itself only, so the two executions compute the same
 * values in the same order. That is what lets CI, which has no GPU, test the kernels' tiling,
 * indexing and tie-breaking on the CPU.
 *
 * Floating point: every multiply-add that should be fused is written as fmaf(); the CUDA code is
 * built with --fmad=false and the host code with -ffp-contract=off, so nothing else is fused and
 * both paths round identically. The library functions that are not correctly rounded differ
 * between the CUDA and the C library (expf above all), so the exponential of AdaMerge's softmax
 * and sigmoid is our own (expDet: fmaf, rintf and exact scalings only).
 *
 * Steps (docs/token-merge-op.md):
 *   split_block  (split_mode = size only) stable rank of the sizes -> token order [A..., B...]
 *   salience     (weighting = salience only; tokenMergeSalience.h) row softmax statistics, column
 *                sums and their min-max normalisation -> each unprotected token's salience
 *   match_block  cosine similarity A x B in 32x32 tiles, best partner per A row, the score
 *                (times the source's salience for AdaMerge), count > threshold or score sums
 *   plan_block   one block per image: r (fixed, threshold or intensity rule), rank of the A
 *                scores (which r merge), output row plan (kept A tokens in A's order), merge
 *                source lists, size_out (and AdaMerge's merged weights), K
 *   merge_lane   one warp per output row: copy kept rows, weighted average for B rows
 */
#ifndef ATM_TOKEN_MERGE_STEPS_H
#define ATM_TOKEN_MERGE_STEPS_H

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define ATM_HD __host__ __device__
#else
#define ATM_HD
#endif

namespace atm
{
namespace steps
{

constexpr int kBlockThreads = 256;
constexpr int kWarpSize = 32;
//! Rows of A and of B per similarity tile, and metric features per shared-memory chunk.
constexpr int kTile = 32;
constexpr int kChunk = 32;
//! Row stride of a shared tile: +4 floats keeps rows 16-byte aligned for float4 reads, and the
//! 8 threads of a float4 access phase land on different banks.
constexpr int kTileStride = kChunk + 4;
//! The 256 threads of a match block form a 16 x 16 grid; each owns 2 A rows x 2 B columns.
constexpr int kHalfTile = kTile / 2;
constexpr int kMergeRowsPerBlock = kBlockThreads / kWarpSize;
constexpr float kNormEps = 1e-12f;
constexpr int32_t kNoIndex = 0x7fffffff;
//! atm_export.merge.SALIENCE_EPS: the least spread of centralities normalised to the full [0, 1].
constexpr float kSalienceEps = 1e-2f;
//! atm_export.merge.SALIENCE_FLOOR: added to the salience in merge weights (salience 0 still counts).
constexpr float kSalienceFloor = 1e-2f;

// ---------------------------------------------------------------------------------------------
// Element conversion. All arithmetic is float32; x and metric may be stored narrower.

ATM_HD inline float toFloat(float v)
{
    return v;
}
ATM_HD inline float toFloat(__half v)
{
    return __half2float(v);
}
ATM_HD inline float toFloat(__nv_bfloat16 v)
{
    return __bfloat162float(v);
}

template <typename T>
ATM_HD inline T fromFloat(float v);
template <>
ATM_HD inline float fromFloat<float>(float v)
{
    return v;
}
template <>
ATM_HD inline __half fromFloat<__half>(float v)
{
    return __float2half_rn(v);
}
template <>
ATM_HD inline __nv_bfloat16 fromFloat<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}

// ---------------------------------------------------------------------------------------------
// Orderings. Each is a strict total order on (value, index), so ranks computed by counting
// predecessors are a permutation: no two tokens can claim the same output slot.

//! Sizes ascending, ties by lower offset (a stable sort). NaN sorts last so the order stays total.
ATM_HD inline bool sizeBefore(float sk, int32_t k, float sj, int32_t j)
{
    bool const kNan = sk != sk;
    bool const jNan = sj != sj;
    if (kNan || jNan)
    {
        return kNan == jNan ? k < j : jNan;
    }
    return sk < sj || (sk == sj && k < j);
}

//! Scores descending, ties by lower position in A. Scores are never NaN (see cosineScore).
ATM_HD inline bool scoreBefore(float sk, int32_t k, float si, int32_t i)
{
    return sk > si || (sk == si && k < i);
}

//! Best partner: the highest similarity, the first B token among equals.
ATM_HD inline bool betterMatch(float s, int32_t j, float best, int32_t bestJ)
{
    return s > best || (s == best && j < bestJ);
}

//! Merge sources grouped by destination, ascending A position within a group.
ATM_HD inline bool sourceBefore(int32_t dk, int32_t k, int32_t di, int32_t i)
{
    return dk < di || (dk == di && k < i);
}

// ---------------------------------------------------------------------------------------------
// Scalar steps.

//! Sizes of A and B, and where the alternate split starts them (docs/token-merge-op.md).
struct SplitShape
{
    int32_t na;
    int32_t nb;
    int32_t firstA; //!< alternate split: A = firstA, firstA + 2, ...
    int32_t firstB; //!< alternate split: B = firstB, firstB + 2, ...
};

//! The split of M = unprotected tokens after P = numProtected protected ones.
//! Alternate (ToMe's split of the whole sequence): A = the unprotected tokens at even positions,
//! B = those at odd positions, so P = 1 gives A = 2, 4, ... and B = 1, 3, ....
//! Size: tokens sorted by size; A = the floor(M/2) smallest, B = the other ceil(M/2).
//! Either split can leave A (P odd, M = 1) or B (P even, M = 1) empty.
ATM_HD inline SplitShape splitShape(int32_t numProtected, int32_t unprotected, bool alternate)
{
    int32_t const odd = numProtected % 2;
    SplitShape s;
    s.firstA = numProtected + odd;
    s.firstB = numProtected + 1 - odd;
    // Even positions in [firstA, N); firstA <= P + 1 <= N, so this is never negative.
    s.na = alternate ? (numProtected + unprotected - s.firstA + 1) / 2 : unprotected / 2;
    s.nb = unprotected - s.na;
    return s;
}

//! ToMe's cap on r: floor(M/2) pairs, whichever the split. It is <= min(Na, Nb), so r never
//! exceeds either set, and it is 0 when one of them is empty.
ATM_HD inline int32_t maxMerges(int32_t unprotected)
{
    return unprotected / 2;
}

//! clamp(a.b / (max(|a|, eps) * max(|b|, eps)), -1, 1). fmaxf/fminf drop NaN, so a NaN similarity
//! becomes -1 and can never win a match.
ATM_HD inline float cosineScore(float dot, float sumsqA, float sumsqB)
{
    float const normA = fmaxf(sqrtf(sumsqA), kNormEps);
    float const normB = fmaxf(sqrtf(sumsqB), kNormEps);
    return fminf(fmaxf(dot / (normA * normB), -1.0f), 1.0f);
}

// ---------------------------------------------------------------------------------------------
// AdaMerge's scalar math. expDet is the same function on both paths (see the top of this file).

//! 2^e as a float, for e in [-126, 127] (a normal number: exact).
ATM_HD inline float pow2(int32_t e)
{
    uint32_t const bits = static_cast<uint32_t>(e + 127) << 23;
    float v;
    memcpy(&v, &bits, sizeof(v));
    return v;
}

//! e^x within about 1 ulp, bitwise the same on the GPU and the CPU: x = k ln2 + r (|r| <= ln2 / 2,
//! ln2 split in two so that k ln2 is exact enough), e^r by its Taylor polynomial of degree 7
//! (error < 1e-8), times 2^k in two exact steps so that results below the normal range round
//! once, like expf's. NaN stays NaN; e^-inf = 0, e^inf = inf.
ATM_HD inline float expDet(float x)
{
    if (!(x > -104.0f))
    {
        return x != x ? x : 0.0f; // below half the smallest denormal
    }
    if (x > 88.7228394f)
    {
        return INFINITY;
    }
    float const k = rintf(x * 1.44269504f);
    float r = fmaf(k, -0.693145752f, x);
    r = fmaf(k, -1.42860677e-6f, r);
    float p = 1.98412698e-4f;
    p = fmaf(p, r, 1.38888889e-3f);
    p = fmaf(p, r, 8.33333333e-3f);
    p = fmaf(p, r, 4.16666667e-2f);
    p = fmaf(p, r, 1.66666667e-1f);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    int32_t const ki = static_cast<int32_t>(k); // in [-150, 128]
    int32_t const k1 = ki / 2;
    return p * pow2(k1) * pow2(ki - k1);
}

//! 1 / (1 + e^-t), as torch.sigmoid.
ATM_HD inline float sigmoidDet(float t)
{
    return 1.0f / (1.0f + expDet(-t));
}

//! AdaMerge's weight of a token in the average: size * (salience + SALIENCE_FLOOR)
//! (atm_export.merge.merge_weights). Every path computes it here, so the weights that sum into
//! a merged token's total are bitwise those the merge divides by it.
ATM_HD inline float mergeWeight(float size, float salience)
{
    return size * (salience + kSalienceFloor);
}

//! The intensity rule's pairs for one image: floor(r_max * sigmoid(scale * (rho - mean) / std)),
//! rho its mean score (atm_export.merge.intensity_counts); 0 for a NaN redundancy.
ATM_HD inline int64_t intensityCount(float rho, int32_t rMax, float mean, float stdDev, float scale)
{
    float const z = (rho - mean) / stdDev;
    float const fraction = static_cast<float>(rMax) * sigmoidDet(scale * z);
    return fraction == fraction ? static_cast<int64_t>(floorf(fraction)) : 0;
}

//! The counting rule of a step, as the params choose it (fixed_r first, then r_max).
struct CountRule
{
    int32_t fixedR;   //!< >= 0: a fixed r
    int32_t rMax;     //!< >= 0 (and fixedR < 0): the intensity rule; else the threshold
    float mean;       //!< the intensity rule's redundancy statistics and slope
    float stdDev;
    float scale;

    ATM_HD bool intensity() const
    {
        return fixedR < 0 && rMax >= 0;
    }
};

//! r: min(fixed_r, cap) for a fixed count, else min(floor(sum of counts / B), cap), with
//! cap = maxMerges(M); the counts are those above the threshold or the intensity rule's r_b.
ATM_HD inline int32_t mergeCount(int32_t fixedR, int64_t totalAbove, int64_t batch, int32_t cap)
{
    if (fixedR >= 0)
    {
        return fixedR < cap ? fixedR : cap;
    }
    int64_t const mean = totalAbove / batch;
    return mean < cap ? static_cast<int32_t>(mean) : cap;
}

// ---------------------------------------------------------------------------------------------
// Which token of the image is A[i] / B[j].

struct SplitView
{
    int32_t numProtected;
    int32_t unprotected; //!< M = N - P
    int32_t na;
    int32_t nb;
    int32_t firstA;       //!< alternate split: the positions of A and B step by 2 from these
    int32_t firstB;
    int32_t const* order; //!< [B, M] token positions, A then B (size split); nullptr: alternate

    ATM_HD int32_t aToken(int64_t b, int32_t i) const
    {
        return order != nullptr ? order[b * unprotected + i] : firstA + 2 * i;
    }
    ATM_HD int32_t bToken(int64_t b, int32_t j) const
    {
        return order != nullptr ? order[b * unprotected + na + j] : firstB + 2 * j;
    }
};

//! The salience of an unprotected token (salience: [B, M], by position after the protected ones).
ATM_HD inline float tokenSalience(float const* salience, SplitView const& split, int64_t b, int32_t token)
{
    return salience[b * split.unprotected + token - split.numProtected];
}

//! Threads keep nothing in registers between the phases of a program that uses this state.
struct NoState
{
};

// ---------------------------------------------------------------------------------------------
// split_block: size-distinctive split. Grid (ceil(M / 256), B); dynamic shared memory M floats.

struct SplitArgs
{
    float const* size; //!< [B, N]
    int64_t numTokens;
    int32_t numProtected;
    int32_t unprotected;
    int32_t* order; //!< [B, M] out: offsets sorted by size (stable), as token positions
};

template <class Exec>
ATM_HD void splitBlock(Exec& ex, float* sizes, SplitArgs const& args, int64_t b, int32_t blockX)
{
    int32_t const m = args.unprotected;
    ex.each([&](int tid, NoState&) {
        for (int32_t k = tid; k < m; k += kBlockThreads)
        {
            sizes[k] = args.size[b * args.numTokens + args.numProtected + k];
        }
    });
    ex.each([&](int tid, NoState&) {
        int32_t const j = blockX * kBlockThreads + tid;
        if (j >= m)
        {
            return;
        }
        float const sj = sizes[j];
        int32_t rank = 0;
        for (int32_t k = 0; k < m; ++k)
        {
            rank += sizeBefore(sizes[k], k, sj, j) ? 1 : 0;
        }
        args.order[b * m + rank] = args.numProtected + j;
    });
}

// ---------------------------------------------------------------------------------------------
// match_block: for 32 rows of A, the best row of B. Grid (ceil(Na / 32), B); no launch when Na = 0.

struct MatchArgs
{
    void const* metric; //!< [B, N, D] of the element type
    SplitView split;
    int64_t numTokens;
    int64_t dim;
    float threshold;
    float const* salience; //!< [B, M] (weighting = salience): scores are salience x similarity; else nullptr
    float* score;       //!< [B, Na] out: best similarity (times the source's salience)
    int32_t* dst;       //!< [B, Na] out: its B position
    int32_t* tileCount; //!< [B, tilesA] out: rows of the tile with score > threshold
    float* tileScore;   //!< [B, tilesA] out (intensity rule; else nullptr): the tile's score sum
    int32_t tilesA;
};

struct MatchShared
{
    alignas(16) float a[kTile][kTileStride];
    alignas(16) float b[kTile][kTileStride];
    float sumsqA[kTile];
    float sumsqB[kTile];
    float candScore[kTile][kHalfTile];
    int32_t candIndex[kTile][kHalfTile];
    int32_t above[kTile];
    float rowScore[kTile]; //!< the rows' scores (0 past Na), summed in row order for the intensity rule
};

struct MatchThread
{
    float dot[2][2];
    float best[2];
    int32_t bestJ[2];
};

//! Load metric features [d0, d0 + 32) of rows first .. first + 31 of a token list (`count` rows;
//! tokenOf(index) is the token position of a row) into shared memory as float32; rows and
//! features past the end read as 0, which adds nothing to dots and norms.
template <typename T, class TokenOf>
ATM_HD inline void loadRows(float (*tile)[kTileStride], void const* metricData, int64_t numTokens, int64_t dim,
    int64_t b, int32_t first, int32_t count, TokenOf const& tokenOf, int64_t d0, int tid)
{
    T const* metric = static_cast<T const*>(metricData);
    for (int e = tid; e < kTile * kChunk; e += kBlockThreads)
    {
        int const row = e / kChunk;
        int const d = e % kChunk;
        int32_t const index = first + row;
        float v = 0.0f;
        if (index < count && d0 + d < dim)
        {
            v = toFloat(metric[(b * numTokens + tokenOf(index)) * dim + d0 + d]);
        }
        tile[row][d] = v;
    }
}

//! loadRows for 32 consecutive A (or B) rows of the split.
template <typename T>
ATM_HD inline void loadChunk(float (*tile)[kTileStride], MatchArgs const& args, int64_t b, int32_t first, bool sideA,
    int64_t d0, int tid)
{
    SplitView const& split = args.split;
    auto const tokenOf = [&](int32_t index) { return sideA ? split.aToken(b, index) : split.bToken(b, index); };
    loadRows<T>(tile, args.metric, args.numTokens, args.dim, b, first, sideA ? split.na : split.nb, tokenOf, d0, tid);
}

//! Four consecutive features of a shared tile row as one 16-byte shared-memory read.
ATM_HD inline float4 quad(float const* row, int d)
{
    return *reinterpret_cast<float4 const*>(row + d);
}

ATM_HD inline float chunkSumsq(float const* row)
{
    float s = 0.0f;
    for (int d = 0; d < kChunk; d += 4)
    {
        float4 const v = quad(row, d);
        s = fmaf(v.x, v.x, s);
        s = fmaf(v.y, v.y, s);
        s = fmaf(v.z, v.z, s);
        s = fmaf(v.w, v.w, s);
    }
    return s;
}

//! dot += a . b over four features, in feature order.
ATM_HD inline float fma4(float4 const& a, float4 const& b, float dot)
{
    dot = fmaf(a.x, b.x, dot);
    dot = fmaf(a.y, b.y, dot);
    dot = fmaf(a.z, b.z, dot);
    return fmaf(a.w, b.w, dot);
}

//! Thread (ty, tx) accumulates dots of A rows ty, ty+16 with B rows tx, tx+16 over one chunk;
//! threads 0..31 also accumulate the squared norm of B row tid. (Any shared tile pair a, b with
//! sumsqB, and thread state with dot[2][2]: the match's and the salience's.)
template <class Shared, class Thread>
ATM_HD inline void accumulateChunk(Shared& sh, Thread& th, int tid)
{
    int const ty = tid / kHalfTile;
    int const tx = tid % kHalfTile;
    for (int d = 0; d < kChunk; d += 4)
    {
        float4 const a0 = quad(sh.a[ty], d);
        float4 const a1 = quad(sh.a[ty + kHalfTile], d);
        float4 const b0 = quad(sh.b[tx], d);
        float4 const b1 = quad(sh.b[tx + kHalfTile], d);
        th.dot[0][0] = fma4(a0, b0, th.dot[0][0]);
        th.dot[0][1] = fma4(a0, b1, th.dot[0][1]);
        th.dot[1][0] = fma4(a1, b0, th.dot[1][0]);
        th.dot[1][1] = fma4(a1, b1, th.dot[1][1]);
    }
    if (tid < kTile)
    {
        sh.sumsqB[tid] += chunkSumsq(sh.b[tid]);
    }
}

//! Turn the finished dots of one B tile into similarities and keep each A row's best.
ATM_HD inline void updateBest(MatchShared const& sh, MatchThread& th, MatchArgs const& args, int32_t row0,
    int32_t col0, int tid)
{
    int const ty = tid / kHalfTile;
    int const tx = tid % kHalfTile;
    for (int u = 0; u < 2; ++u)
    {
        int const localRow = ty + u * kHalfTile;
        if (row0 + localRow >= args.split.na)
        {
            continue;
        }
        for (int v = 0; v < 2; ++v)
        {
            int const localCol = tx + v * kHalfTile;
            int32_t const j = col0 + localCol;
            if (j >= args.split.nb)
            {
                continue;
            }
            float const s = cosineScore(th.dot[u][v], sh.sumsqA[localRow], sh.sumsqB[localCol]);
            if (betterMatch(s, j, th.best[u], th.bestJ[u]))
            {
                th.best[u] = s;
                th.bestJ[u] = j;
            }
        }
    }
}

//! Thread tid < 32 reduces the 16 candidates of A row tid and writes score, dst and the flag.
ATM_HD inline void finishRow(MatchShared& sh, MatchArgs const& args, int64_t b, int32_t row0, int tid)
{
    if (tid >= kTile)
    {
        return;
    }
    float best = -INFINITY;
    int32_t bestJ = kNoIndex;
    for (int k = 0; k < kHalfTile; ++k)
    {
        if (betterMatch(sh.candScore[tid][k], sh.candIndex[tid][k], best, bestJ))
        {
            best = sh.candScore[tid][k];
            bestJ = sh.candIndex[tid][k];
        }
    }
    int32_t const i = row0 + tid;
    bool const valid = i < args.split.na;
    if (valid && args.split.nb == 0)
    {
        best = -1.0f; // nothing to merge into (the reference's convention)
        bestJ = 0;
    }
    if (valid && args.salience != nullptr)
    {
        // AdaMerge: the partner stays the most similar B token; the score that ranks the pair,
        // meets the threshold and makes the redundancy is weighted by the source's salience.
        best = tokenSalience(args.salience, args.split, b, args.split.aToken(b, i)) * best;
    }
    if (valid)
    {
        args.score[b * args.split.na + i] = best;
        args.dst[b * args.split.na + i] = bestJ;
    }
    sh.above[tid] = (valid && best > args.threshold) ? 1 : 0;
    sh.rowScore[tid] = valid ? best : 0.0f;
}

template <typename T, class Exec>
ATM_HD void matchBlock(Exec& ex, MatchShared& sh, MatchArgs const& args, int64_t b, int32_t tileA)
{
    int32_t const row0 = tileA * kTile;
    ex.each([&](int tid, MatchThread& th) {
        th.best[0] = th.best[1] = -INFINITY;
        th.bestJ[0] = th.bestJ[1] = kNoIndex;
        if (tid < kTile)
        {
            sh.sumsqA[tid] = 0.0f;
        }
    });
    // Squared norms of this tile's A rows.
    for (int64_t d0 = 0; d0 < args.dim; d0 += kChunk)
    {
        ex.each([&](int tid, MatchThread&) { loadChunk<T>(sh.a, args, b, row0, true, d0, tid); });
        ex.each([&](int tid, MatchThread&) {
            if (tid < kTile)
            {
                sh.sumsqA[tid] += chunkSumsq(sh.a[tid]);
            }
        });
    }
    // Dots against every B tile; the A chunk is reloaded (from L1/L2) so any D fits.
    for (int32_t col0 = 0; col0 < args.split.nb; col0 += kTile)
    {
        ex.each([&](int tid, MatchThread& th) {
            th.dot[0][0] = th.dot[0][1] = th.dot[1][0] = th.dot[1][1] = 0.0f;
            if (tid < kTile)
            {
                sh.sumsqB[tid] = 0.0f;
            }
        });
        for (int64_t d0 = 0; d0 < args.dim; d0 += kChunk)
        {
            ex.each([&](int tid, MatchThread&) {
                loadChunk<T>(sh.a, args, b, row0, true, d0, tid);
                loadChunk<T>(sh.b, args, b, col0, false, d0, tid);
            });
            ex.each([&](int tid, MatchThread& th) { accumulateChunk(sh, th, tid); });
        }
        ex.each([&](int tid, MatchThread& th) { updateBest(sh, th, args, row0, col0, tid); });
    }
    ex.each([&](int tid, MatchThread& th) {
        int const ty = tid / kHalfTile;
        int const tx = tid % kHalfTile;
        for (int u = 0; u < 2; ++u)
        {
            sh.candScore[ty + u * kHalfTile][tx] = th.best[u];
            sh.candIndex[ty + u * kHalfTile][tx] = th.bestJ[u];
        }
    });
    ex.each([&](int tid, MatchThread&) { finishRow(sh, args, b, row0, tid); });
    ex.each([&](int tid, MatchThread&) {
        if (tid == 0)
        {
            int32_t count = 0;
            float sum = 0.0f; // in row order: the intensity rule's redundancy is a fixed-order mean
            for (int k = 0; k < kTile; ++k)
            {
                count += sh.above[k];
                sum += sh.rowScore[k];
            }
            args.tileCount[b * args.tilesA + tileA] = count;
            if (args.tileScore != nullptr)
            {
                args.tileScore[b * args.tilesA + tileA] = sum;
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// plan_block: one block per image. Decides r (the same in every block: each sums all counts;
// at most floor(M/2)), ranks A by score to pick the r merged tokens, and writes the output row
// plan (protected, kept A in A's order, B in B's order), the merge source lists, size_out and K.

struct PlanArgs
{
    float const* score;
    int32_t const* dst;
    int32_t const* tileCount;
    float const* tileScore; //!< [B, tilesA] (intensity rule): the tiles' score sums
    int32_t tilesA;
    int64_t batch;
    CountRule rule;
    float const* size; //!< [B, N]
    float const* salience; //!< [B, M] (weighting = salience), else nullptr
    SplitView split;
    int64_t numTokens;
    int32_t* plan;       //!< [B, N] out: output row -> token to copy, or -1 - j for B row j
    int32_t* srcOffset;  //!< [B, Nb + 1] out: merge sources of B row j are srcList[off[j] .. off[j+1])
    int32_t* srcList;    //!< [B, Na] out: token positions of the merged A tokens
    float* mergedWeight; //!< [B, Nb] out (weighting = salience): B row j's total merge weight
    float* sizeOut;      //!< [B, K] out (compact)
    int64_t* numTokensOut;
};

//! The intensity rule's r_b of image `image`: its redundancy rho = the mean score over A (tile
//! sums added in tile order, so every plan block gets the same bits), 0 when A is empty.
ATM_HD inline int64_t imageIntensityCount(PlanArgs const& args, int64_t image)
{
    float sum = 0.0f;
    for (int32_t t = 0; t < args.tilesA; ++t)
    {
        sum += args.tileScore[image * args.tilesA + t];
    }
    int32_t const na = args.split.na;
    float const rho = na > 0 ? sum / static_cast<float>(na) : 0.0f;
    return intensityCount(rho, args.rule.rMax, args.rule.mean, args.rule.stdDev, args.rule.scale);
}

//! Shared memory of plan_block: this header, then score, size and dst, rank arrays of Na each.
struct PlanShared
{
    int64_t partial[kBlockThreads];
    int32_t r;
};

ATM_HD inline size_t planSharedBytes(int32_t na)
{
    return sizeof(PlanShared) + static_cast<size_t>(na) * (2 * sizeof(float) + 2 * sizeof(int32_t));
}

struct PlanArrays
{
    PlanShared* head;
    float* score;
    float* sizeA;
    int32_t* dst;
    int32_t* rank;
};

ATM_HD inline PlanArrays carvePlanShared(unsigned char* smem, int32_t na)
{
    PlanArrays p;
    p.head = reinterpret_cast<PlanShared*>(smem);
    p.score = reinterpret_cast<float*>(smem + sizeof(PlanShared));
    p.sizeA = p.score + na;
    p.dst = reinterpret_cast<int32_t*>(p.sizeA + na);
    p.rank = p.dst + na;
    return p;
}

//! Where the A token at position i goes: merged into its partner (score rank < r), or kept, in
//! A's order, after the protected tokens (only *which* tokens merge depends on the scores).
ATM_HD inline void emitA(PlanArrays const& sh, PlanArgs const& args, int64_t b, int32_t i, int32_t r, int64_t nOut)
{
    SplitView const& split = args.split;
    int32_t const token = split.aToken(b, i);
    if (sh.rank[i] < r)
    {
        int32_t pos = 0;
        for (int32_t k = 0; k < split.na; ++k)
        {
            pos += (sh.rank[k] < r && sourceBefore(sh.dst[k], k, sh.dst[i], i)) ? 1 : 0;
        }
        args.srcList[b * split.na + pos] = token;
        return;
    }
    int32_t keptBefore = 0;
    for (int32_t k = 0; k < i; ++k)
    {
        keptBefore += sh.rank[k] >= r ? 1 : 0;
    }
    int64_t const o = split.numProtected + keptBefore;
    args.plan[b * args.numTokens + o] = token;
    args.sizeOut[b * nOut + o] = sh.sizeA[i];
}

//! B row j: its source-list offset and its merged size (and AdaMerge's merged weight), summed in
//! ascending A position.
ATM_HD inline void emitB(PlanArrays const& sh, PlanArgs const& args, int64_t b, int32_t j, int32_t r, int64_t nOut)
{
    SplitView const& split = args.split;
    int32_t before = 0;
    int32_t const target = split.bToken(b, j);
    float merged = args.size[b * args.numTokens + target];
    bool const weighted = args.salience != nullptr;
    float weight = weighted ? mergeWeight(merged, tokenSalience(args.salience, split, b, target)) : 0.0f;
    for (int32_t k = 0; k < split.na; ++k)
    {
        if (sh.rank[k] >= r)
        {
            continue;
        }
        before += sh.dst[k] < j ? 1 : 0;
        if (sh.dst[k] == j)
        {
            merged += sh.sizeA[k];
            if (weighted)
            {
                weight += mergeWeight(sh.sizeA[k], tokenSalience(args.salience, split, b, split.aToken(b, k)));
            }
        }
    }
    if (weighted)
    {
        args.mergedWeight[b * split.nb + j] = weight;
    }
    args.srcOffset[b * (split.nb + 1) + j] = before;
    int64_t const o = split.numProtected + split.na - r + j;
    args.plan[b * args.numTokens + o] = -1 - j;
    args.sizeOut[b * nOut + o] = merged;
}

template <class Exec>
ATM_HD void planBlock(Exec& ex, unsigned char* smem, PlanArgs const& args, int64_t b)
{
    SplitView const& split = args.split;
    int32_t const na = split.na;
    PlanArrays const sh = carvePlanShared(smem, na);
    int64_t const counts = args.batch * args.tilesA;
    ex.each([&](int tid, NoState&) {
        for (int32_t i = tid; i < na; i += kBlockThreads)
        {
            sh.score[i] = args.score[b * na + i];
            sh.dst[i] = args.dst[b * na + i];
            sh.sizeA[i] = args.size[b * args.numTokens + split.aToken(b, i)];
        }
        // Every block sums the whole batch's counts (pairs above the threshold, or the intensity
        // rule's r_b per image), so every image gets the same r.
        int64_t sum = 0;
        if (args.rule.intensity())
        {
            for (int64_t image = tid; image < args.batch; image += kBlockThreads)
            {
                sum += imageIntensityCount(args, image);
            }
        }
        else
        {
            for (int64_t k = tid; k < counts; k += kBlockThreads)
            {
                sum += args.tileCount[k];
            }
        }
        sh.head->partial[tid] = sum;
    });
    for (int stride = kBlockThreads / 2; stride > 0; stride /= 2)
    {
        ex.each([&](int tid, NoState&) {
            if (tid < stride)
            {
                sh.head->partial[tid] += sh.head->partial[tid + stride];
            }
        });
    }
    ex.each([&](int tid, NoState&) {
        if (tid == 0)
        {
            sh.head->r = mergeCount(args.rule.fixedR, sh.head->partial[0], args.batch, maxMerges(split.unprotected));
        }
        for (int32_t i = tid; i < na; i += kBlockThreads)
        {
            int32_t rank = 0;
            for (int32_t k = 0; k < na; ++k)
            {
                rank += scoreBefore(sh.score[k], k, sh.score[i], i) ? 1 : 0;
            }
            sh.rank[i] = rank;
        }
    });
    ex.each([&](int tid, NoState&) {
        int32_t const r = sh.head->r;
        int64_t const nOut = args.numTokens - r;
        for (int32_t i = tid; i < na; i += kBlockThreads)
        {
            emitA(sh, args, b, i, r, nOut);
        }
        for (int32_t j = tid; j < split.nb; j += kBlockThreads)
        {
            emitB(sh, args, b, j, r, nOut);
        }
        for (int32_t p = tid; p < split.numProtected; p += kBlockThreads)
        {
            args.plan[b * args.numTokens + p] = p;
            args.sizeOut[b * nOut + p] = args.size[b * args.numTokens + p];
        }
        if (tid == 0)
        {
            args.srcOffset[b * (split.nb + 1) + split.nb] = r;
            if (b == 0)
            {
                *args.numTokensOut = nOut;
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// merge_lane: one warp per output row, each lane VEC consecutive channels at a time.
// Grid (ceil(N / 8), B); rows past K return at once.

struct MergeArgs
{
    void const* x;        //!< [B, N, C]
    float const* size;    //!< [B, N]
    void* xOut;           //!< [B, K, C] (compact)
    float const* sizeOut; //!< [B, K], from plan_block: the divisor of merged rows
    float const* salience;     //!< [B, M] (weighting = salience), else nullptr: size-weighted
    float const* mergedWeight; //!< [B, Nb] (weighting = salience): the divisor of merged rows
    int32_t const* plan;
    int32_t const* srcOffset;
    int32_t const* srcList;
    int64_t const* numTokensOut;
    SplitView split;
    int64_t numTokens;
    int64_t channels;
};

//! VEC elements as one 16-byte access when VEC > 1 (the caller checked alignment).
template <typename T, int VEC>
ATM_HD inline void loadVec(T const* p, float (&out)[VEC])
{
    if constexpr (VEC == 1)
    {
        out[0] = toFloat(p[0]);
    }
    else
    {
        static_assert(sizeof(T) * VEC == sizeof(uint4), "vector accesses are 16 bytes");
        uint4 const raw = *reinterpret_cast<uint4 const*>(p);
        T vals[VEC];
        memcpy(static_cast<void*>(vals), &raw, sizeof(raw));
        for (int k = 0; k < VEC; ++k)
        {
            out[k] = toFloat(vals[k]);
        }
    }
}

template <typename T, int VEC>
ATM_HD inline void storeVec(T* p, float const (&in)[VEC])
{
    if constexpr (VEC == 1)
    {
        p[0] = fromFloat<T>(in[0]);
    }
    else
    {
        T vals[VEC];
        for (int k = 0; k < VEC; ++k)
        {
            vals[k] = fromFloat<T>(in[k]);
        }
        uint4 raw;
        memcpy(&raw, static_cast<void const*>(vals), sizeof(raw));
        *reinterpret_cast<uint4*>(p) = raw;
    }
}

//! Kept rows are copied bit for bit, without a round trip through float.
template <typename T, int VEC>
ATM_HD inline void copyVec(T const* from, T* to)
{
    if constexpr (VEC == 1)
    {
        to[0] = from[0];
    }
    else
    {
        *reinterpret_cast<uint4*>(to) = *reinterpret_cast<uint4 const*>(from);
    }
}

//! AdaMerge's B row j (atm_export.merge.merge_weighted with the plan's weights): x_t + sum_s
//! (x_s - x_t) (w_s / W'_j), w = mergeWeight(size, salience), W'_j from plan_block; sources in
//! ascending A position. Each delta is rounded before it is added, as the reference's scatter-add.
template <typename T, int VEC>
ATM_HD void mergeSalienceRow(MergeArgs const& args, int64_t b, int32_t j, T const* targetRow, int32_t const* sources,
    int32_t first, int32_t last, T* out, int lane)
{
    int64_t const c = args.channels;
    T const* x = static_cast<T const*>(args.x);
    float const total = args.mergedWeight[b * args.split.nb + j];
    int64_t const step = static_cast<int64_t>(kWarpSize) * VEC;
    for (int64_t k = static_cast<int64_t>(lane) * VEC; k < c; k += step)
    {
        float xt[VEC];
        float acc[VEC];
        loadVec<T, VEC>(targetRow + k, xt);
        for (int e = 0; e < VEC; ++e)
        {
            acc[e] = xt[e];
        }
        for (int32_t s = first; s < last; ++s)
        {
            int32_t const token = sources[s];
            float const w = mergeWeight(args.size[b * args.numTokens + token],
                                tokenSalience(args.salience, args.split, b, token))
                / total;
            float v[VEC];
            loadVec<T, VEC>(x + (b * args.numTokens + token) * c + k, v);
            for (int e = 0; e < VEC; ++e)
            {
                acc[e] = acc[e] + (v[e] - xt[e]) * w; // not fused, as the reference
            }
        }
        storeVec<T, VEC>(out + k, acc);
    }
}

template <typename T, int VEC>
ATM_HD void mergeLane(MergeArgs const& args, int64_t b, int64_t o, int lane)
{
    int64_t const nOut = *args.numTokensOut;
    if (o >= nOut)
    {
        return;
    }
    int64_t const c = args.channels;
    T const* x = static_cast<T const*>(args.x);
    T* out = static_cast<T*>(args.xOut) + (b * nOut + o) * c;
    int64_t const step = static_cast<int64_t>(kWarpSize) * VEC;
    int32_t const entry = args.plan[b * args.numTokens + o];
    if (entry >= 0)
    {
        T const* in = x + (b * args.numTokens + entry) * c;
        for (int64_t k = static_cast<int64_t>(lane) * VEC; k < c; k += step)
        {
            copyVec<T, VEC>(in + k, out + k);
        }
        return;
    }
    int32_t const j = -1 - entry;
    int32_t const target = args.split.bToken(b, j);
    int32_t const first = args.srcOffset[b * (args.split.nb + 1) + j];
    int32_t const last = args.srcOffset[b * (args.split.nb + 1) + j + 1];
    int32_t const* sources = args.srcList + b * args.split.na;
    T const* targetRow = x + (b * args.numTokens + target) * c;
    if (args.salience != nullptr)
    {
        mergeSalienceRow<T, VEC>(args, b, j, targetRow, sources, first, last, out, lane);
        return;
    }
    // B row j: (size_t x_t + sum_s size_s x_s) / size'_j, sources in ascending A position.
    float const targetSize = args.size[b * args.numTokens + target];
    float const mergedSize = args.sizeOut[b * nOut + o];
    for (int64_t k = static_cast<int64_t>(lane) * VEC; k < c; k += step)
    {
        float acc[VEC];
        loadVec<T, VEC>(targetRow + k, acc);
        for (int e = 0; e < VEC; ++e)
        {
            acc[e] = targetSize * acc[e];
        }
        for (int32_t s = first; s < last; ++s)
        {
            int32_t const token = sources[s];
            float const w = args.size[b * args.numTokens + token];
            float v[VEC];
            loadVec<T, VEC>(x + (b * args.numTokens + token) * c + k, v);
            for (int e = 0; e < VEC; ++e)
            {
                acc[e] = acc[e] + w * v[e]; // not fused: the reference rounds the product first
            }
        }
        for (int e = 0; e < VEC; ++e)
        {
            acc[e] = acc[e] / mergedSize;
        }
        storeVec<T, VEC>(out + k, acc);
    }
}

} // namespace steps
} // namespace atm

#endif // ATM_TOKEN_MERGE_STEPS_H
