/*
 * Entry points of libatm_token_merge_plugin_dynamic.so, the form IPluginRegistry::loadLibrary
 * (trtexec --dynamicPlugins, --setPluginsToSerialize, version-compatible engines) expects:
 *
 *     extern "C" void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
 *     extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
 *
 * (documented in TensorRT's samples/trtexec/README.md for 10.x and 11.x). The library registers
 * nothing by itself when loaded, and uses no libnvinfer symbol.
 */
#include "tokenMergePlugin.h"

#define ATM_PLUGIN_EXPORT __attribute__((visibility("default")))

extern "C" ATM_PLUGIN_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    atm::plugin::setLoggerFinder(finder);
}

extern "C" ATM_PLUGIN_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static atm::plugin::TokenMergePluginCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}
