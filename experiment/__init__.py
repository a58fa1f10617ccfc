"""moekit.experiment: the experiment layer above moekit.core, moekit.moe and moekit.multimodal (task wiring,
comparisons, reports)."""
