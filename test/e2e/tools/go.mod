module github.com/zq-csi/zq-csi/test/e2e/tools

go 1.24.0
