// A Go program of the kind the field uses: net/rpc with the ugorji msgpack-rpc codec, talking to
// statefuld over its socket. It prints one line per check, "name: value", for tests/test_interop.py.
package main

import (
	"fmt"
	"net"
	"net/rpc"
	"os"

	"github.com/ugorji/go/codec"
)

func main() {
	conn, err := net.Dial("unix", os.Args[1])
	if err != nil {
		fmt.Println("dial:", err)
		os.Exit(1)
	}
	var handle codec.MsgpackHandle
	handle.RawToString = true
	client := rpc.NewClientWithCodec(codec.MsgpackSpecRpc.ClientCodec(conn, &handle))
	defer client.Close()

	var nothing interface{}
	// Errors must come as strings for net/rpc: ask for that first.
	err = client.Call("set_error_format", "string", &nothing) // one argument: the codec makes it ["string"]
	fmt.Println("set_error_format:", err)

	var pong string
	err = client.Call("ping", codec.MsgpackSpecRpcMultiArgs(nil), &pong) // no arguments: sent as nil params
	fmt.Println("ping:", pong, err)

	var previous interface{}
	err = client.Call("set_linked_pod", codec.MsgpackSpecRpcMultiArgs{"game", "gopher", "lobby", 5, -1}, &previous)
	fmt.Println("set_linked_pod:", previous, err)

	var pod int
	err = client.Call("get_linked_pod", codec.MsgpackSpecRpcMultiArgs{"game", "gopher", "lobby"}, &pod)
	fmt.Println("get_linked_pod:", pod, err)

	err = client.Call("get_linked_pod", codec.MsgpackSpecRpcMultiArgs{"game", "bad{uid", "lobby"}, &pod)
	fmt.Println("error:", err)

	// The connection survives the error reply.
	err = client.Call("ping", codec.MsgpackSpecRpcMultiArgs(nil), &pong)
	fmt.Println("ping again:", pong, err)
}
