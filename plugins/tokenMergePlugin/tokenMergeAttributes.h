/*
 * The TensorRT plugin's host logic that needs no TensorRT: reading the op's attributes from plugin
 * fields, checking them and the input shapes, and the output token bounds given to TensorRT.
 * It lives in the kernel library so that CI can test it through ctypes; tokenMergePlugin.cpp
 * only translates TensorRT types to these.
 */
#ifndef ATM_TOKEN_MERGE_ATTRIBUTES_H
#define ATM_TOKEN_MERGE_ATTRIBUTES_H

#include "tokenMergeContract.h"
#include "tokenMergeKernel.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Field types, numerically equal to nvinfer1::PluginFieldType (checked by static_assert in
 * tokenMergePlugin.cpp), so that a plugin field's type converts with a cast. */
enum atm_field_type
{
    ATM_FIELD_FLOAT16 = 0,
    ATM_FIELD_FLOAT32 = 1,
    ATM_FIELD_FLOAT64 = 2,
    ATM_FIELD_INT8 = 3,
    ATM_FIELD_INT16 = 4,
    ATM_FIELD_INT32 = 5,
    ATM_FIELD_CHAR = 6,
    ATM_FIELD_INT64 = 10
};

/* The attributes of docs/token-merge-op.md: the four that change the math, and the output token
 * count TensorRT tunes for. Names and defaults: tokenMergeContract.h. */
typedef struct atm_token_merge_attributes
{
    float threshold;        /* merge the pairs more similar than this (when fixed_r < 0) */
    int32_t fixed_r;        /* >= 0: merge this many pairs; < 0: use the threshold */
    int32_t split_mode;     /* atm_token_merge_split_mode */
    int32_t num_protected;  /* leading tokens that are never merged */
    int32_t opt_num_tokens; /* the size tensor's auto-tuning value (-1: unknown) */
} atm_token_merge_attributes;

/* One named value, as TensorRT's PluginField: `length` elements of `type` at `data`. */
typedef struct atm_plugin_field
{
    const char* name;
    const void* data;
    int32_t type;
    int32_t length;
} atm_plugin_field;

ATM_TOKEN_MERGE_API void atm_token_merge_default_attributes(atm_token_merge_attributes* out);

/* Start from the defaults and apply `fields`. Accepted: threshold (float32/float64 or an integer
 * type), fixed_r, split_mode, num_protected, opt_num_tokens (any integer type, in int32 range); plugin_version and
 * plugin_namespace are accepted and ignored (the ONNX parser's lookup keys). Any other name, a
 * wrong type, an empty field or an invalid value is an error (message: atm_token_merge_last_error). */
ATM_TOKEN_MERGE_API int atm_token_merge_parse_attributes(
    const atm_plugin_field* fields, int32_t count, atm_token_merge_attributes* out);

/* split_mode in {0, 1}, num_protected >= 0, opt_num_tokens >= -1, threshold not NaN when fixed_r < 0. */
ATM_TOKEN_MERGE_API int atm_token_merge_validate_attributes(const atm_token_merge_attributes* attrs);

/* Check the input shapes x [B, N, C], size [B, N], metric [B, N, D]; -1 marks a dimension not
 * known yet (build time), which matches anything. Checks ranks, equal B and N, and, where N is
 * known, num_protected < N and N - num_protected <= ATM_TOKEN_MERGE_MAX_UNPROTECTED. */
ATM_TOKEN_MERGE_API int atm_token_merge_check_shapes(const int64_t* x_dims, int32_t x_rank,
    const int64_t* size_dims, int32_t size_rank, const int64_t* metric_dims, int32_t metric_rank,
    const atm_token_merge_attributes* attrs);

/* The kernels' parameters for concrete shapes x [B, N, C], metric [B, N, D]. */
ATM_TOKEN_MERGE_API int atm_token_merge_make_params(const int64_t* x_dims, const int64_t* metric_dims,
    const atm_token_merge_attributes* attrs, int32_t dtype, atm_token_merge_params* out);

/* Output token count bounds for N input tokens: upper = N, opt = opt_num_tokens when it is set
 * (> 0), else N - the expected r (fixed: min(fixed_r, floor(M/2)); threshold: floor(floor(M/2) / 2);
 * M = N - num_protected, so both are 0 when M = 1). Same formula as the plugin's size-tensor
 * declaration (token_bounds below). */
ATM_TOKEN_MERGE_API int atm_token_merge_token_bounds(
    int64_t num_tokens, const atm_token_merge_attributes* attrs, int64_t* opt, int64_t* upper);

#ifdef __cplusplus
}

namespace atm
{

template <class Expr>
struct TokenBounds
{
    Expr opt;
    Expr upper;
};

/* The bounds as a formula over an algebra of dimension expressions: integers for the C function
 * above, IExprBuilder expressions in the plugin. Alg provides constant, sub, min, floorDiv. */
template <class Alg>
TokenBounds<typename Alg::Expr> tokenBounds(Alg& alg, typename Alg::Expr n, atm_token_merge_attributes const& attrs)
{
    auto const m = alg.sub(n, alg.constant(attrs.num_protected));
    auto const cap = alg.floorDiv(m, alg.constant(2)); // ToMe's cap on r, floor(M/2): 0 when M = 1
    auto const expected
        = attrs.fixed_r >= 0 ? alg.min(alg.constant(attrs.fixed_r), cap) : alg.floorDiv(cap, alg.constant(2));
    // TensorRT wants an opt that does not depend on a size tensor; after the first merge N is one,
    // so the exporter records the count it saw (opt_num_tokens).
    auto const opt = attrs.opt_num_tokens > 0 ? alg.constant(attrs.opt_num_tokens) : alg.sub(n, expected);
    return TokenBounds<typename Alg::Expr>{opt, n};
}

} // namespace atm
#endif

#endif /* ATM_TOKEN_MERGE_ATTRIBUTES_H */
