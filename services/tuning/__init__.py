"""The tuning job: LoRA/QLoRA fine-tuning from dataset URLs; the adapter is pushed as an OCI artifact."""
