"""Attacks on vodstack, one regression test per finding of issue 11, each written to fail first."""
