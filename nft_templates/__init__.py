"""nftables templates the node agent loads (shipped as package data so an installed agent finds them)."""
