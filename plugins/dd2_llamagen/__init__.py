"""dd2 teacher family plugin (llamagen): work in progress."""
