"""The provisioner: makes a plan's nodes exist (local, bring-your-own, …) and says when they are ready."""
