"""The cost model of the GPU backends (bench/cost_model.py is its command line).

hardware.py: the machines and every constant of the time model; resources.py: the
compiled kernels' registers and shared memory (nvcc for CUDA, triton_capture.py for
Triton); model.py: one kernel's row; passes.py: what each pass runs, the grid,
totals and the criteria of issue 11.
"""
