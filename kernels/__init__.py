"""Kernel images that boot on partitions. Each module holds one ``partition.Kernel`` subclass."""
