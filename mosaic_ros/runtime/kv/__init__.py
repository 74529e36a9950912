"""Host-offloaded KV storage and the retrieval policies that decide what reaches the device."""
