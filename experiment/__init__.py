"""moekit.experiment: the experiment layer above core, moe and multimodal."""
