/*
 * TensorRT IPluginV3 adapter for the TokenMerge op (docs/token-merge-op.md).
 *
 * Plugin name "TokenMerge", version "2", namespace "atm_export" (tokenMergeContract.h): the keys the
 * ONNX parser looks up for a node of op_type TokenMerge with plugin_version = "2", plugin_namespace =
 * "atm_export".
 * Version 2 follows ToMe's split and cap (A = even positions, r <= floor((N - P) / 2)); version 1
 * split right after the protected tokens and capped r by ceil((N - P) / 2): other results, hence
 * another version.
 *
 *   inputs   0 x [B, N, C] float32|float16   1 size [B, N] float32   2 metric [B, N, D] like x
 *   outputs  0 x_out [B, K, C] like x   1 size_out [B, K] float32   2 num_tokens: K, 0-D INT32
 *            (the ONNX graph casts it to int64). fixed_r >= 0: K = N - min(fixed_r, floor((N - P) / 2)),
 *            an expression of N, and num_tokens a plain tensor; fixed_r < 0 (the threshold rule, or
 *            AdaMerge's intensity rule when r_max >= 0): a size tensor (declareSizeTensor(2, opt,
 *            upper), upper = N or max_num_tokens; tokenMergeAttributes.h)
 *   fields   the attributes of tokenMergeContract.h: floats FLOAT32 (threshold,
 *            salience_temperature, redundancy_mean / _std / _scale), ints INT32 (fixed_r, split_mode,
 *            num_protected, opt_num_tokens, max_num_tokens, weighting, r_max), as the ONNX parser
 *            passes them
 *
 * All math is in the kernel library (tokenMergeKernel.h); attribute parsing, shape checks and
 * the token bounds are in tokenMergeAttributes.h. This class translates TensorRT's types.
 */
#ifndef ATM_TOKEN_MERGE_PLUGIN_H
#define ATM_TOKEN_MERGE_PLUGIN_H

#include "tokenMergeAttributes.h"
#include "tokenMergeContract.h"

#include <NvInferRuntime.h>

#include <string>
#include <vector>

namespace atm
{
namespace plugin
{

constexpr char const* kPluginName = ATM_TOKEN_MERGE_PLUGIN_NAME;
constexpr char const* kPluginVersion = ATM_TOKEN_MERGE_PLUGIN_VERSION;
constexpr char const* kPluginNamespace = ATM_TOKEN_MERGE_PLUGIN_NAMESPACE;

//! Where error messages go: the logger TensorRT handed to setLoggerFinder() if any, else stderr.
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;
void logError(std::string const& message) noexcept;

class TokenMergePlugin : public nvinfer1::IPluginV3,
                         public nvinfer1::IPluginV3OneCore,
                         public nvinfer1::IPluginV3OneBuild,
                         public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit TokenMergePlugin(atm_token_merge_attributes const& attrs);
    TokenMergePlugin(TokenMergePlugin const& other);
    TokenMergePlugin& operator=(TokenMergePlugin const&) = delete;
    ~TokenMergePlugin() override = default;

    atm_token_merge_attributes const& attributes() const noexcept
    {
        return mAttrs;
    }

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    char const* getTimingCacheID() noexcept override;
    char const* getMetadataString() noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    //! Point the serialization fields at this object's own attribute storage.
    void initFields();

    atm_token_merge_attributes mAttrs;
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
    std::string mDescription;
};

class TokenMergePluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    TokenMergePluginCreator();

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace plugin
} // namespace atm

#endif // ATM_TOKEN_MERGE_PLUGIN_H
