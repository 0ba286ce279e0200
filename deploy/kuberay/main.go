// Command kuberay-validate runs KubeRay's own admission checks (the ones its operator applies before
// it reconciles) on RayService / RayJob objects read as JSON documents from stdin, one per line.
// It prints one line per object: "ok <kind>/<name>" or "invalid <kind>/<name>: <reason>", and exits 1
// when any object is invalid. The tests use it on everything the workload renders.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"

	rayv1 "github.com/ray-project/kuberay/ray-operator/apis/ray/v1"
	"github.com/ray-project/kuberay/ray-operator/controllers/ray/utils"
)

func validate(doc []byte) (string, error) {
	var meta struct {
		Kind     string `json:"kind"`
		Metadata struct {
			Name string `json:"name"`
		} `json:"metadata"`
	}
	if err := json.Unmarshal(doc, &meta); err != nil {
		return "?", err
	}
	id := meta.Kind + "/" + meta.Metadata.Name
	switch meta.Kind {
	case "RayService":
		var obj rayv1.RayService
		if err := json.Unmarshal(doc, &obj); err != nil {
			return id, err
		}
		if err := utils.ValidateRayServiceMetadata(obj.ObjectMeta); err != nil {
			return id, err
		}
		return id, utils.ValidateRayServiceSpec(&obj)
	case "RayJob":
		var obj rayv1.RayJob
		if err := json.Unmarshal(doc, &obj); err != nil {
			return id, err
		}
		if err := utils.ValidateRayJobMetadata(obj.ObjectMeta); err != nil {
			return id, err
		}
		return id, utils.ValidateRayJobSpec(&obj)
	}
	return id, fmt.Errorf("not a RayService or RayJob")
}

func main() {
	scanner := bufio.NewScanner(os.Stdin)
	scanner.Buffer(make([]byte, 1<<20), 16<<20)
	failed := false
	for scanner.Scan() {
		if len(scanner.Bytes()) == 0 {
			continue
		}
		id, err := validate(scanner.Bytes())
		if err != nil {
			failed = true
			fmt.Printf("invalid %s: %v\n", id, err)
		} else {
			fmt.Printf("ok %s\n", id)
		}
	}
	if failed {
		os.Exit(1)
	}
}
