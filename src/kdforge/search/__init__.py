"""Student architecture search (KD-NAS, Trivedi et al. 2023; AutoKD, Eyono et al. 2021)."""
