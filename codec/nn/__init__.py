"""The IMF networks (Gao et al., "Implicit Motion Function", CVPR 2024): config and presets,
E_F, E_T, IMF_D, IMF_A, D_F, the learned keyframe codec, reusable layers, and weights files."""
