"""Generated tandem API packages (see protos/tandem/*/ for the .proto sources)."""
