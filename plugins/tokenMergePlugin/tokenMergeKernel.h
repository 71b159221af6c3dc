/*
 * TokenMerge kernels: one ATM / AdaMerge merge step (docs/token-merge-op.md) as a small C interface.
 *
 * The library knows nothing about TensorRT; the TensorRT plugin (tokenMergePlugin.cpp), the
 * Python binding (atm_export/cuda_kernels.py) and the tests all call these functions.
 *
 * Memory layout: every tensor is dense and row-major.
 *   x        [B, N, C]   dtype (float32 / float16 / bfloat16)
 *   size     [B, N]      float32
 *   metric   [B, N, D]   dtype
 *   x_out    [B, K, C]   dtype,   K = N - r, written compactly (the buffer holds B*N*C elements)
 *   size_out [B, K]      float32, written compactly (the buffer holds B*N elements)
 *   num_tokens_out       one int64, K
 * r is only known once the kernels ran, so the output buffers are sized for the upper bound N and
 * the first B*K*C (B*K) elements hold the result.
 */
#ifndef ATM_TOKEN_MERGE_KERNEL_H
#define ATM_TOKEN_MERGE_KERNEL_H

#include "tokenMergeContract.h"

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define ATM_TOKEN_MERGE_API
#else
#define ATM_TOKEN_MERGE_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Element type of x, metric and x_out. size and size_out are always float32. */
enum atm_token_merge_dtype
{
    ATM_DTYPE_FLOAT32 = 0,
    ATM_DTYPE_FLOAT16 = 1,
    ATM_DTYPE_BFLOAT16 = 2
};

/* The split_mode attribute of the op (codes from tokenMergeContract.h). */
enum atm_token_merge_split_mode
{
    ATM_SPLIT_ALTERNATE = ATM_TOKEN_MERGE_SPLIT_ALTERNATE,
    ATM_SPLIT_SIZE = ATM_TOKEN_MERGE_SPLIT_SIZE
};

/* The weighting attribute of the op (codes from tokenMergeContract.h). */
enum atm_token_merge_weighting
{
    ATM_WEIGHTING_SIZE = ATM_TOKEN_MERGE_WEIGHTING_SIZE,
    ATM_WEIGHTING_SALIENCE = ATM_TOKEN_MERGE_WEIGHTING_SALIENCE
};

/* Return values of every function below that returns int. */
enum atm_token_merge_status
{
    ATM_STATUS_OK = 0,
    ATM_STATUS_INVALID_ARGUMENT = 1,
    ATM_STATUS_UNSUPPORTED = 2,
    ATM_STATUS_WORKSPACE_TOO_SMALL = 3,
    ATM_STATUS_CUDA_ERROR = 4,
    ATM_STATUS_INTERNAL_ERROR = 5
};

/* Largest N - num_protected the kernels accept (the per-image planning keeps Na scores in
 * shared memory). N = 577 (ViT at 384 px) uses 576 of it. */
#define ATM_TOKEN_MERGE_MAX_UNPROTECTED 4096
/* Largest batch: the batch is the grid's y dimension. */
#define ATM_TOKEN_MERGE_MAX_BATCH 65535

/* How many pairs merge: fixed_r if >= 0; else the intensity rule if r_max >= 0; else the threshold. */
typedef struct atm_token_merge_params
{
    int64_t batch;         /* B >= 1 */
    int64_t num_tokens;    /* N >= num_protected + 1 */
    int64_t channels;      /* C >= 1 */
    int64_t metric_dim;    /* D >= 1 */
    int32_t num_protected; /* P >= 0: leading tokens that are never merged */
    int32_t split_mode;    /* atm_token_merge_split_mode */
    int32_t fixed_r;       /* >= 0: merge min(fixed_r, floor((N - P) / 2)) pairs; < 0: intensity or threshold */
    float threshold;       /* batch-adaptive count: pairs with score > threshold */
    int32_t dtype;         /* atm_token_merge_dtype of x, metric and x_out */
    int32_t weighting;     /* atm_token_merge_weighting: size (ATM) or salience (AdaMerge) */
    float salience_temperature; /* > 0: tau of the salience softmax(u u^T / tau) (weighting = salience) */
    int32_t r_max;         /* >= 0 (and fixed_r < 0): AdaMerge's intensity rule, image b merges
                              floor(r_max * sigmoid(scale * (rho_b - mean) / std)) pairs; -1: off */
    float redundancy_mean; /* the intensity rule's mean, std (> 0) and scale */
    float redundancy_std;
    float redundancy_scale;
} atm_token_merge_params;

/* sizeof(atm_token_merge_params), so that bindings can check their copy of the struct. */
ATM_TOKEN_MERGE_API size_t atm_token_merge_params_size(void);

/* ATM_STATUS_OK if the parameters describe a problem the kernels handle; otherwise a status and
 * a message for atm_token_merge_last_error(). */
ATM_TOKEN_MERGE_API int atm_token_merge_check(const atm_token_merge_params* params);

/* Bytes of device scratch memory atm_token_merge_enqueue needs (0 if the parameters are invalid).
 * For given attributes it grows with batch and num_tokens only, so the size for the largest
 * shapes covers smaller ones. weighting = salience adds the salience arrays (4 floats per token),
 * the intensity rule one float per 32 source tokens. */
ATM_TOKEN_MERGE_API size_t atm_token_merge_workspace_size(const atm_token_merge_params* params);

/* Enqueue one merge step on `stream` (3 kernel launches, +1 with split_mode = size, +3 with
 * weighting = salience, one fewer when the source set A is empty). All pointers are device pointers; workspace holds at least
 * atm_token_merge_workspace_size() bytes, aligned to 8 bytes (cudaMalloc and TensorRT give 256).
 * Returns without synchronising; errors of the launches are reported. */
ATM_TOKEN_MERGE_API int atm_token_merge_enqueue(const atm_token_merge_params* params, const void* x,
    const float* size, const void* metric, void* x_out, float* size_out, int64_t* num_tokens_out,
    void* workspace, size_t workspace_bytes, cudaStream_t stream);

/* The same merge step on the CPU, running the kernels' block programs in loops (same arithmetic,
 * same order: results are bitwise equal to the CUDA path). Host pointers; scratch memory is
 * allocated internally. Meant for tests and small inputs. */
ATM_TOKEN_MERGE_API int atm_token_merge_host(const atm_token_merge_params* params, const void* x,
    const float* size, const void* metric, void* x_out, float* size_out, int64_t* num_tokens_out);

/* A fixed description of a status value. */
ATM_TOKEN_MERGE_API const char* atm_token_merge_status_string(int status);

/* The message of the last failing call on this thread ("" if none failed yet). */
ATM_TOKEN_MERGE_API const char* atm_token_merge_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* ATM_TOKEN_MERGE_KERNEL_H */
