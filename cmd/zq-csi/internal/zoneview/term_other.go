//go:build !linux

package zoneview

func isTerminal(uintptr) bool { return false }
