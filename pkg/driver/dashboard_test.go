package driver

import (
	"encoding/json"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// TestDashboardMetrics: the chart's Grafana dashboard is valid JSON and
// every metric its PromQL expressions (and variable queries) name is one
// this driver's registry serves.
func TestDashboardMetrics(t *testing.T) {
	raw, err := os.ReadFile("../../charts/zq-csi/dashboards/zq-csi.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title  string `json:"title"`
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Definition string `json:"definition"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("dashboard JSON: %v", err)
	}
	td := newTestDriver(t, "")
	names, err := td.MetricNames()
	if err != nil {
		t.Fatal(err)
	}
	// Histograms are queried through their series.
	known := map[string]bool{}
	for _, n := range names {
		for _, s := range []string{"", "_bucket", "_sum", "_count"} {
			known[n+s] = true
		}
	}
	exprs := []string{}
	for _, p := range dash.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			exprs = append(exprs, tg.Expr)
		}
	}
	for _, v := range dash.Templating.List {
		exprs = append(exprs, v.Definition)
	}
	metric := regexp.MustCompile(`\b(zq_csi_[a-z0-9_]+|go_[a-z0-9_]+|process_[a-z0-9_]+)\b`)
	seen := 0
	for _, e := range exprs {
		for _, m := range metric.FindAllString(e, -1) {
			seen++
			if !known[m] {
				t.Errorf("dashboard query %q names %s, which the driver does not export", e, m)
			}
		}
	}
	if seen < 10 || !slices.ContainsFunc(exprs, func(e string) bool { return strings.Contains(e, "zq_csi_volume_zone_refusals_total") }) {
		t.Errorf("the dashboard names %d metrics; want the zone refusals among at least 10", seen)
	}
}
