// Main for Catch2 v2 (header only). With v3 the tests link Catch2::Catch2WithMain instead.
#define CATCH_CONFIG_MAIN
#include "catch_compat.h"
