"""The networks of DxMI: sampler, value function, energies (vector and pixel mode)."""
