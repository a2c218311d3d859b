"""dd2 teacher family plugin (var): work in progress."""
