/*
 * Self-registration for libatm_token_merge_plugin.so: loading the library (dlopen, ctypes.CDLL,
 * trtexec --staticPlugins, polygraphy --plugins) registers the TokenMerge creator with
 * TensorRT's global plugin registry, under namespace "atm_export".
 *
 * This is what REGISTER_TENSORRT_PLUGIN does, except that the macro registers under namespace ""
 * and our creator reports "atm_export"; registering under the creator's own namespace keeps the
 * two in agreement whichever of them the registry keys on.
 *
 * This unit must not be linked into the same library as tokenMergePluginEntryPoints.cpp:
 * IPluginRegistry::loadLibrary fails when a creator it is about to register already registered
 * itself at load time.
 */
#include "tokenMergePlugin.h"

namespace
{

class StaticRegistration
{
public:
    StaticRegistration() noexcept
    {
        static atm::plugin::TokenMergePluginCreator creator;
        nvinfer1::IPluginRegistry* registry = getPluginRegistry();
        if (registry == nullptr || !registry->registerCreator(creator, atm::plugin::kPluginNamespace))
        {
            atm::plugin::logError("could not register the TokenMerge creator (is the library loaded twice?)");
        }
    }
};

StaticRegistration const gStaticRegistration;

} // namespace
