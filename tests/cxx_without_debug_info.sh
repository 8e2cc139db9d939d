#!/bin/sh
# The C++ compiler for the tests' DeepSpeed ops (CPU Adam, shared-memory collectives): `c++` with the same
# arguments, less DeepSpeed's `-g`. The code is the same (-O3 stays); the debug information alone was about a third
# of the compile's CPU here. scripts/setup.sh builds the ops with it and tests/conftest.py sets it as CXX, so the
# tests find the ops built with the same command (ninja rebuilds an object whose command changed).
for arg do
    shift
    [ "$arg" = -g ] || set -- "$@" "$arg"
done
exec c++ "$@"
