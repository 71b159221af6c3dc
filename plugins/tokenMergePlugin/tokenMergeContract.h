/*
 * The TokenMerge op contract (docs/token-merge-op.md) for the C and C++ side: the op's identity,
 * its attribute names and defaults, and the split-mode and weighting codes.
 *
 * It mirrors atm_export/contract.py, the contract's one Python statement; tests/test_contract.py
 * keeps the two equal (it reads the #defines below as text, so keep one plain value per line).
 * Every C++ file takes these facts from here: the kernel library's split modes
 * (tokenMergeKernel.h), the attribute parser and its defaults (tokenMergeAttributes.cpp), the
 * TensorRT plugin's name, version, namespace and fields (tokenMergePlugin.h/.cpp) and the harness.
 *
 * Macros only, so that C and C++ (and the preprocessor) can use it.
 */
#ifndef ATM_TOKEN_MERGE_CONTRACT_H
#define ATM_TOKEN_MERGE_CONTRACT_H

/* Identity. The plugin's name, version and namespace are what TensorRT's ONNX parser looks the
 * creator up by: the node's op type, its plugin_version attribute and its domain. */
#define ATM_TOKEN_MERGE_PLUGIN_NAME "TokenMerge"      /* contract.OP_TYPE */
#define ATM_TOKEN_MERGE_PLUGIN_VERSION "2"            /* contract.PLUGIN_VERSION */
#define ATM_TOKEN_MERGE_PLUGIN_NAMESPACE "atm_export" /* contract.PLUGIN_NAMESPACE, = DOMAIN */
#define ATM_TOKEN_MERGE_OP_VERSION 2                  /* contract.VERSION */

/* split_mode values (contract.SPLIT_CODES, by the split names of atm_export.merge). */
#define ATM_TOKEN_MERGE_SPLIT_ALTERNATE 0
#define ATM_TOKEN_MERGE_SPLIT_SIZE 1

/* weighting values (contract.WEIGHTING_CODES, by the weighting names of atm_export.merge):
 * size: ATM / ToMe (scores are cosines, averages weighted by size); salience: AdaMerge (scores
 * and averaging weights also use each token's salience). */
#define ATM_TOKEN_MERGE_WEIGHTING_SIZE 0
#define ATM_TOKEN_MERGE_WEIGHTING_SALIENCE 1

/* Attribute names, which are also the plugin's field names (the keys of contract.DEFAULTS).
 * The last two are the ONNX parser's lookup keys (contract.LOOKUP_KEYS): accepted, not math. */
#define ATM_TOKEN_MERGE_ATTR_THRESHOLD "threshold"
#define ATM_TOKEN_MERGE_ATTR_FIXED_R "fixed_r"
#define ATM_TOKEN_MERGE_ATTR_SPLIT_MODE "split_mode"
#define ATM_TOKEN_MERGE_ATTR_NUM_PROTECTED "num_protected"
#define ATM_TOKEN_MERGE_ATTR_OPT_NUM_TOKENS "opt_num_tokens"
#define ATM_TOKEN_MERGE_ATTR_MAX_NUM_TOKENS "max_num_tokens"
#define ATM_TOKEN_MERGE_ATTR_WEIGHTING "weighting"
#define ATM_TOKEN_MERGE_ATTR_SALIENCE_TEMPERATURE "salience_temperature"
#define ATM_TOKEN_MERGE_ATTR_R_MAX "r_max"
#define ATM_TOKEN_MERGE_ATTR_REDUNDANCY_MEAN "redundancy_mean"
#define ATM_TOKEN_MERGE_ATTR_REDUNDANCY_STD "redundancy_std"
#define ATM_TOKEN_MERGE_ATTR_REDUNDANCY_SCALE "redundancy_scale"
#define ATM_TOKEN_MERGE_ATTR_PLUGIN_VERSION "plugin_version"
#define ATM_TOKEN_MERGE_ATTR_PLUGIN_NAMESPACE "plugin_namespace"

/* Attribute defaults (contract.DEFAULTS), one per name above: ATM_TOKEN_MERGE_DEFAULT_<X> is the
 * default of ATM_TOKEN_MERGE_ATTR_<X>. */
#define ATM_TOKEN_MERGE_DEFAULT_THRESHOLD 1.0f
#define ATM_TOKEN_MERGE_DEFAULT_FIXED_R (-1) /* < 0: use the threshold */
#define ATM_TOKEN_MERGE_DEFAULT_SPLIT_MODE ATM_TOKEN_MERGE_SPLIT_ALTERNATE
#define ATM_TOKEN_MERGE_DEFAULT_NUM_PROTECTED 1
#define ATM_TOKEN_MERGE_DEFAULT_OPT_NUM_TOKENS (-1) /* unknown */
#define ATM_TOKEN_MERGE_DEFAULT_MAX_NUM_TOKENS (-1) /* unknown */
#define ATM_TOKEN_MERGE_DEFAULT_WEIGHTING ATM_TOKEN_MERGE_WEIGHTING_SIZE
#define ATM_TOKEN_MERGE_DEFAULT_SALIENCE_TEMPERATURE 1.0f
#define ATM_TOKEN_MERGE_DEFAULT_R_MAX (-1) /* < 0: no intensity rule (fixed_r or the threshold) */
#define ATM_TOKEN_MERGE_DEFAULT_REDUNDANCY_MEAN 0.0f
#define ATM_TOKEN_MERGE_DEFAULT_REDUNDANCY_STD 1.0f
#define ATM_TOKEN_MERGE_DEFAULT_REDUNDANCY_SCALE 1.0f
#define ATM_TOKEN_MERGE_DEFAULT_PLUGIN_VERSION ATM_TOKEN_MERGE_PLUGIN_VERSION
#define ATM_TOKEN_MERGE_DEFAULT_PLUGIN_NAMESPACE ATM_TOKEN_MERGE_PLUGIN_NAMESPACE

/* Exported graphs name the node of block b (1-based) "TokenMerge_b<b>" (contract.node_name).
 * Documentation only: nothing in C++ reads node names. */
#define ATM_TOKEN_MERGE_NODE_PREFIX ATM_TOKEN_MERGE_PLUGIN_NAME "_b"

#endif /* ATM_TOKEN_MERGE_CONTRACT_H */
