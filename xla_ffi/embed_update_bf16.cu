// sok_embed_bwd_update for __nv_bfloat16 tables (embed_update.cuh).
#include "embed_update.cuh"

namespace sok {
namespace embed_cuda {
template ffi::Error BwdUpdateFor<__nv_bfloat16>(BwdUpdateCall&);
}  // namespace embed_cuda
}  // namespace sok
