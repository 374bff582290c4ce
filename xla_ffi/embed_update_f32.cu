// sok_embed_bwd_update for float tables (embed_update.cuh).
#include "embed_update.cuh"

namespace sok {
namespace embed_cuda {
template ffi::Error BwdUpdateFor<float>(BwdUpdateCall&);
}  // namespace embed_cuda
}  // namespace sok
