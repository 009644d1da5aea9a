package imgcmd

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

const checkUsage = `Usage: zq-csi img check [-q] [-f FMT] [--output=human|json] [-r leaks|all] [-U] FILE

Check the consistency of a qcow2 image, like qemu-img check.

  -r leaks         free clusters that nothing references
  -r all           also fix refcounts that are too low
  --output=FORMAT  human (default) or json
  -q               quiet

Exit status: 0 no problems, 1 the check could not be completed, 2 corruptions
remain, 3 only leaks remain, 63 the format (raw) has no checks.
`

// jsonCheck is qemu-img's ImageCheck in the key order qemu-img 7.2 prints.
type jsonCheck struct {
	ImageEndOffset     uint64 `json:"image-end-offset,omitempty"`
	CompressedClusters uint64 `json:"compressed-clusters,omitempty"`
	TotalClusters      uint64 `json:"total-clusters,omitempty"`
	Corruptions        int    `json:"corruptions,omitempty"`
	CorruptionsFixed   int    `json:"corruptions-fixed,omitempty"`
	CheckErrors        int    `json:"check-errors"`
	Leaks              int    `json:"leaks,omitempty"`
	LeaksFixed         int    `json:"leaks-fixed,omitempty"`
	AllocatedClusters  uint64 `json:"allocated-clusters,omitempty"`
	Filename           string `json:"filename"`
	Format             string `json:"format"`
	FragmentedClusters uint64 `json:"fragmented-clusters,omitempty"`
}

func runCheck(e Env, args []string) int {
	opts, pos, code, done := parseArgs(e, "check", args, optSpec{short: "f:r:qU", long: map[string]bool{"output": true, "force-share": false}})
	if done {
		return code
	}
	var (
		want, output = "", "human"
		co           qcow2.CheckOptions
		quiet        bool
	)
	for _, o := range opts {
		switch o.name {
		case "f":
			want = o.val
		case "q":
			quiet = true
		case "U", "force-share":
			co.ForceShare = true
		case "r":
			switch o.val {
			case "leaks":
				co.RepairLeaks = true
			case "all":
				co.RepairLeaks, co.RepairAll = true, true
			default:
				return usageFail(e, "check", "Invalid option for -r, expecting leaks or all")
			}
		case "output":
			var err error
			if output, err = outputFormat(o.val); err != nil {
				return fail(e, "", err)
			}
		}
	}
	if len(pos) != 1 {
		return usageFail(e, "check", "Expecting one image file name")
	}
	file := pos[0]
	if co.ForceShare && co.RepairLeaks {
		return fail(e, file, errors.New("force-share=on can only be used with read-only images"))
	}
	format, _, err := resolveFormat(file, want)
	if err != nil {
		return fail(e, file, err)
	}
	if format != fmtQcow2 {
		fmt.Fprintf(e.Stderr, "%s: This image format does not support checks\n", prog)
		return 63
	}
	res, err := qcow2.Check(file, co)
	if err != nil {
		return fail(e, file, err)
	}
	// qemu-img prints the per-problem lines on stderr as it finds them.
	for _, m := range res.Messages {
		fmt.Fprintln(e.Stderr, m)
	}
	// Like qemu-img, Check re-checks a repaired image: Corruptions and
	// Leaks are what remains, the *Fixed counts what the repair fixed.
	jc := jsonCheck{
		ImageEndOffset:     res.ImageEndOffset,
		CompressedClusters: res.CompressedClusters,
		TotalClusters:      res.TotalClusters,
		Corruptions:        res.Corruptions,
		CorruptionsFixed:   res.CorruptionsFixed,
		CheckErrors:        res.CheckErrors,
		Leaks:              res.Leaks,
		LeaksFixed:         res.LeaksFixed,
		AllocatedClusters:  res.AllocatedClusters,
		Filename:           file,
		Format:             format,
		FragmentedClusters: res.FragmentedClusters,
	}
	if output == "json" {
		b, err := json.MarshalIndent(jc, "", "    ")
		if err != nil {
			return fail(e, file, err)
		}
		fmt.Fprintf(e.Stdout, "%s\n", b)
	} else if !quiet {
		fmt.Fprint(e.Stdout, humanCheck(jc))
	}
	return res.ExitCode()
}

// humanCheck is qemu-img's dump_human_image_check, preceded by the repair
// summary img_check prints.
func humanCheck(c jsonCheck) string {
	s := ""
	if c.LeaksFixed > 0 || c.CorruptionsFixed > 0 {
		s += fmt.Sprintf("The following inconsistencies were found and repaired:\n\n"+
			"    %d leaked clusters\n    %d corruptions\n\nDouble checking the fixed image now...\n",
			c.LeaksFixed, c.CorruptionsFixed)
	}
	if c.Corruptions == 0 && c.Leaks == 0 && c.CheckErrors == 0 {
		s += "No errors were found on the image.\n"
	} else {
		if c.Corruptions > 0 {
			s += fmt.Sprintf("\n%d errors were found on the image.\n"+
				"Data may be corrupted, or further writes to the image may corrupt it.\n", c.Corruptions)
		}
		if c.Leaks > 0 {
			s += fmt.Sprintf("\n%d leaked clusters were found on the image.\n"+
				"This means waste of disk space, but no harm to data.\n", c.Leaks)
		}
		if c.CheckErrors > 0 {
			s += fmt.Sprintf("\n%d internal errors have occurred during the check.\n", c.CheckErrors)
		}
	}
	if c.TotalClusters != 0 && c.AllocatedClusters != 0 {
		s += fmt.Sprintf("%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
			c.AllocatedClusters, c.TotalClusters,
			float64(c.AllocatedClusters)*100/float64(c.TotalClusters),
			float64(c.FragmentedClusters)*100/float64(c.AllocatedClusters),
			float64(c.CompressedClusters)*100/float64(c.AllocatedClusters))
	}
	if c.ImageEndOffset != 0 {
		s += fmt.Sprintf("Image end offset: %d\n", c.ImageEndOffset)
	}
	return s
}
