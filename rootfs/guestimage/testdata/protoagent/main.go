// Command protoagent stands in for a podvm-agent built with plain `go build`: it links
// google.golang.org/protobuf as published (TestBuildErrors).
package main

import (
	"fmt"

	"google.golang.org/protobuf/proto"
)

func main() { fmt.Println(proto.Equal(nil, nil)) }
