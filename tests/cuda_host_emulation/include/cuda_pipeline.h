// Stands in for the CUDA toolkit header of this name in the host emulation.
#pragma once
#include "../cuda_host_emulation.h"
