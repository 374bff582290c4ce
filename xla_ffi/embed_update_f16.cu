// sok_embed_bwd_update for __half tables (embed_update.cuh).
#include "embed_update.cuh"

namespace sok {
namespace embed_cuda {
template ffi::Error BwdUpdateFor<__half>(BwdUpdateCall&);
}  // namespace embed_cuda
}  // namespace sok
