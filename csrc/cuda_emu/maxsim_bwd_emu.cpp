// csrc/maxsim/maxsim_bwd.cu, unchanged, compiled as host C++ for reatt_kernels._C_emu (REATT_CUDA_EMU is defined by
// CMake for this target). One such two-line file per .cu file.
#include "../maxsim/maxsim_bwd.cu"
