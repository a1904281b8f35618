"""torch.library custom ops (namespace ``reatt``) and the functional API built on them."""
