/*
 * AdaMerge's token salience as block programs (weighting = salience), in the style of
 * tokenMergeSteps.h: written once over an executor, run by the CUDA kernels and the CPU executor.
 *
 * atm_export.merge.salience, per image, over the M unprotected tokens u (unit metric rows):
 *   A = u u^T / tau, P = row-wise softmax(A), c_j = sum_i P[i, j],
 *   s = (c - min c) / max(max c - min c, SALIENCE_EPS).
 * A is M x M per image (M <= 4096): too large to keep, so it is recomputed in 32 x 32 tiles, as
 * the match computes its similarities, in two passes, and no pass needs atomics:
 *   salience_rows     grid (ceil(M / 32), B): for 32 rows i, the softmax statistics over all j:
 *                     row max m_i and sum l_i = sum_j e^(A_ij - m_i), accumulated online per
 *                     thread and combined in a fixed thread order
 *   salience_columns  grid (ceil(M / 32), B): for 32 columns j, c_j = sum_i e^(A_ij - m_i) / l_i.
 *                     A is symmetric, and bitwise so here (fmaf and the norm product commute),
 *                     so the block computes A_ji with its own tokens as the tile's rows
 *   salience_normalize grid (B): min and max of c (exact in any order), then s in place of c
 * Protected tokens have no salience entry (the reference's 1 is never read).
 */
#ifndef ATM_TOKEN_MERGE_SALIENCE_H
#define ATM_TOKEN_MERGE_SALIENCE_H

#include "tokenMergeSteps.h"

namespace atm
{
namespace steps
{

struct SalienceArgs
{
    void const* metric; //!< [B, N, D] of the element type
    int64_t numTokens;
    int64_t dim;
    int32_t numProtected;
    int32_t unprotected; //!< M
    float temperature;   //!< tau > 0
    float* rowMax;       //!< [B, M] out (rows pass), in (columns pass): m_i
    float* rowSum;       //!< [B, M] likewise: l_i
    float* salience;     //!< [B, M] out: c_j (columns pass), then s_j (normalize)
};

//! Shared memory of both passes: the block's own 32 tokens (a, the tile's rows) and 32 others (b).
struct SalienceShared
{
    alignas(16) float a[kTile][kTileStride];
    alignas(16) float b[kTile][kTileStride];
    float sumsqA[kTile];
    float sumsqB[kTile];
    float otherMax[kTile]; //!< columns pass: m_i and l_i of the other tokens
    float otherSum[kTile];
    float partMax[kTile][kHalfTile]; //!< per own row, the 16 threads' partial statistics
    float partSum[kTile][kHalfTile];
};

struct SalienceThread
{
    float dot[2][2];
    float max[2]; //!< rows pass: running row max of the thread's own rows
    float sum[2]; //!< rows pass: running sum of e^(A - max); columns pass: partial column sums
};

enum class SaliencePass
{
    kRows,
    kColumns
};

//! A_ij = cos(u_i, u_j) / tau, the cosine as the match's (not clamped: the reference's is not).
ATM_HD inline float affinity(float dot, float sumsqI, float sumsqJ, float temperature)
{
    float const normI = fmaxf(sqrtf(sumsqI), kNormEps);
    float const normJ = fmaxf(sqrtf(sumsqJ), kNormEps);
    return dot / (normI * normJ) / temperature;
}

//! One more element of a row's online softmax statistics (max, sum of e^(a - max)).
ATM_HD inline void onlineSoftmax(float a, float& max, float& sum)
{
    if (a > max)
    {
        sum = sum * expDet(max - a) + 1.0f; // e^-inf = 0 for the first element
        max = a;
    }
    else
    {
        sum += expDet(a - max);
    }
}

//! The block's own tokens (unprotected positions row0 ..) against every other tile of tokens.
template <typename T, SaliencePass kPass, class Exec>
ATM_HD void salienceBlock(Exec& ex, SalienceShared& sh, SalienceArgs const& args, int64_t b, int32_t tile)
{
    int32_t const m = args.unprotected;
    int32_t const row0 = tile * kTile;
    int32_t const p = args.numProtected;
    auto const tokenOf = [p](int32_t index) { return p + index; };
    ex.each([&](int tid, SalienceThread& th) {
        th.max[0] = th.max[1] = -INFINITY;
        th.sum[0] = th.sum[1] = 0.0f;
        if (tid < kTile)
        {
            sh.sumsqA[tid] = 0.0f;
        }
    });
    for (int64_t d0 = 0; d0 < args.dim; d0 += kChunk)
    {
        ex.each([&](int tid, SalienceThread&) {
            loadRows<T>(sh.a, args.metric, args.numTokens, args.dim, b, row0, m, tokenOf, d0, tid);
        });
        ex.each([&](int tid, SalienceThread&) {
            if (tid < kTile)
            {
                sh.sumsqA[tid] += chunkSumsq(sh.a[tid]);
            }
        });
    }
    for (int32_t col0 = 0; col0 < m; col0 += kTile)
    {
        ex.each([&](int tid, SalienceThread& th) {
            th.dot[0][0] = th.dot[0][1] = th.dot[1][0] = th.dot[1][1] = 0.0f;
            if (tid < kTile)
            {
                sh.sumsqB[tid] = 0.0f;
                int32_t const i = col0 + tid;
                if (kPass == SaliencePass::kColumns && i < m)
                {
                    sh.otherMax[tid] = args.rowMax[b * m + i];
                    sh.otherSum[tid] = args.rowSum[b * m + i];
                }
            }
        });
        for (int64_t d0 = 0; d0 < args.dim; d0 += kChunk)
        {
            ex.each([&](int tid, SalienceThread&) {
                loadRows<T>(sh.a, args.metric, args.numTokens, args.dim, b, row0, m, tokenOf, d0, tid);
                loadRows<T>(sh.b, args.metric, args.numTokens, args.dim, b, col0, m, tokenOf, d0, tid);
            });
            ex.each([&](int tid, SalienceThread& th) { accumulateChunk(sh, th, tid); });
        }
        ex.each([&](int tid, SalienceThread& th) {
            int const ty = tid / kHalfTile;
            int const tx = tid % kHalfTile;
            for (int u = 0; u < 2; ++u)
            {
                int const localRow = ty + u * kHalfTile;
                if (row0 + localRow >= m)
                {
                    continue;
                }
                for (int v = 0; v < 2; ++v)
                {
                    int const localCol = tx + v * kHalfTile;
                    if (col0 + localCol >= m)
                    {
                        continue;
                    }
                    float const a = affinity(th.dot[u][v], sh.sumsqA[localRow], sh.sumsqB[localCol], args.temperature);
                    if (kPass == SaliencePass::kRows)
                    {
                        onlineSoftmax(a, th.max[u], th.sum[u]);
                    }
                    else
                    {
                        // Own token j is the column: P[i, j] = e^(A_ij - m_i) / l_i, A_ij = A_ji.
                        th.sum[u] += expDet(a - sh.otherMax[localCol]) / sh.otherSum[localCol];
                    }
                }
            }
        });
    }
    ex.each([&](int tid, SalienceThread& th) {
        int const ty = tid / kHalfTile;
        int const tx = tid % kHalfTile;
        for (int u = 0; u < 2; ++u)
        {
            sh.partMax[ty + u * kHalfTile][tx] = th.max[u];
            sh.partSum[ty + u * kHalfTile][tx] = th.sum[u];
        }
    });
    // Thread tid < 32 combines the 16 partials of own row tid, in thread order.
    ex.each([&](int tid, SalienceThread&) {
        int32_t const i = row0 + tid;
        if (tid >= kTile || i >= m)
        {
            return;
        }
        if (kPass == SaliencePass::kRows)
        {
            float max = -INFINITY;
            for (int k = 0; k < kHalfTile; ++k)
            {
                max = fmaxf(max, sh.partMax[tid][k]);
            }
            float sum = 0.0f;
            for (int k = 0; k < kHalfTile; ++k)
            {
                // A thread that saw no column has sum 0 and max -inf: it adds 0 * 0.
                sum += sh.partSum[tid][k] * expDet(sh.partMax[tid][k] - max);
            }
            args.rowMax[b * m + i] = max;
            args.rowSum[b * m + i] = sum;
        }
        else
        {
            float sum = 0.0f;
            for (int k = 0; k < kHalfTile; ++k)
            {
                sum += sh.partSum[tid][k];
            }
            args.salience[b * m + i] = sum;
        }
    });
}

struct NormalizeShared
{
    float lo[kBlockThreads];
    float hi[kBlockThreads];
};

//! One block per image: s = (c - min c) / max(max c - min c, SALIENCE_EPS), in place.
template <class Exec>
ATM_HD void salienceNormalizeBlock(Exec& ex, NormalizeShared& sh, SalienceArgs const& args, int64_t b)
{
    int32_t const m = args.unprotected;
    float* c = args.salience + b * m;
    ex.each([&](int tid, NoState&) {
        float lo = INFINITY;
        float hi = -INFINITY;
        for (int32_t k = tid; k < m; k += kBlockThreads)
        {
            lo = fminf(lo, c[k]);
            hi = fmaxf(hi, c[k]);
        }
        sh.lo[tid] = lo;
        sh.hi[tid] = hi;
    });
    for (int stride = kBlockThreads / 2; stride > 0; stride /= 2)
    {
        ex.each([&](int tid, NoState&) {
            if (tid < stride)
            {
                sh.lo[tid] = fminf(sh.lo[tid], sh.lo[tid + stride]);
                sh.hi[tid] = fmaxf(sh.hi[tid], sh.hi[tid + stride]);
            }
        });
    }
    ex.each([&](int tid, NoState&) {
        float const lo = sh.lo[0];
        float const spread = fmaxf(sh.hi[0] - lo, kSalienceEps);
        for (int32_t k = tid; k < m; k += kBlockThreads)
        {
            c[k] = (c[k] - lo) / spread;
        }
    });
}

} // namespace steps
} // namespace atm

#endif // ATM_TOKEN_MERGE_SALIENCE_H
