package qmp

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"
)

// Event is an asynchronous QMP event such as SHUTDOWN or DEVICE_DELETED.
type Event struct {
	Name string
	// Data is the event's "data" member, or nil when it has none.
	Data json.RawMessage
	// Timestamp is when QEMU emitted the event (zero when QEMU sent none).
	Timestamp time.Time
}

// Error is a QMP error reply. Class is QMP's error class (e.g. "GenericError",
// "DeviceNotFound", "CommandNotFound"), Desc its human-readable description.
type Error struct {
	Cmd   string
	Class string
	Desc  string
}

func (e *Error) Error() string {
	return fmt.Sprintf("qmp: %s: %s: %s", e.Cmd, e.Class, e.Desc)
}

// Version is QEMU's version as announced in the QMP greeting.
type Version struct {
	Major, Minor, Micro int
	Package             string
}

func (v Version) String() string {
	s := fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Micro)
	if v.Package != "" {
		s += " (" + v.Package + ")"
	}
	return s
}

// AtLeast reports whether v is at least major.minor.
func (v Version) AtLeast(major, minor int) bool {
	return v.Major > major || (v.Major == major && v.Minor >= minor)
}

type messageKind int

const (
	kindGreeting messageKind = iota + 1
	kindReply
	kindEvent
)

// message is one decoded line from QEMU.
type message struct {
	kind messageKind

	// kindGreeting
	version      Version
	capabilities []string

	// kindReply
	hasID  bool
	id     uint64
	ret    json.RawMessage
	errRep *Error // Cmd is filled in by the caller

	// kindEvent
	event Event
}

// wire is every member any QMP server message may carry.
type wire struct {
	QMP *struct {
		Version struct {
			QEMU struct {
				Major int `json:"major"`
				Minor int `json:"minor"`
				Micro int `json:"micro"`
			} `json:"qemu"`
			Package string `json:"package"`
		} `json:"version"`
		Capabilities []string `json:"capabilities"`
	} `json:"QMP"`
	Return    json.RawMessage               `json:"return"`
	Error     *struct{ Class, Desc string } `json:"error"`
	ID        json.RawMessage               `json:"id"`
	Event     string                        `json:"event"`
	Data      json.RawMessage               `json:"data"`
	Timestamp *struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

var errEmptyMessage = errors.New("empty message")

// decode turns one line received from QEMU into a message. It never panics; anything that
// is not a greeting, a reply or an event is an error.
func decode(line []byte) (*message, error) {
	line = bytes.TrimSpace(line)
	if len(line) == 0 {
		return nil, errEmptyMessage
	}
	var w wire
	if err := json.Unmarshal(line, &w); err != nil {
		return nil, fmt.Errorf("malformed QMP message %.80q: %w", line, err)
	}
	switch {
	case w.QMP != nil:
		v := w.QMP.Version
		return &message{
			kind:         kindGreeting,
			version:      Version{Major: v.QEMU.Major, Minor: v.QEMU.Minor, Micro: v.QEMU.Micro, Package: v.Package},
			capabilities: w.QMP.Capabilities,
		}, nil
	case w.Event != "":
		ev := Event{Name: w.Event}
		if len(w.Data) > 0 && !bytes.Equal(w.Data, []byte("null")) {
			ev.Data = w.Data
		}
		if ts := w.Timestamp; ts != nil && ts.Seconds >= 0 && ts.Microseconds >= 0 && ts.Microseconds < 1e6 {
			ev.Timestamp = time.Unix(ts.Seconds, ts.Microseconds*1000)
		}
		return &message{kind: kindEvent, event: ev}, nil
	case w.Return != nil || w.Error != nil:
		m := &message{kind: kindReply}
		if w.Error != nil {
			m.errRep = &Error{Class: w.Error.Class, Desc: w.Error.Desc}
		} else {
			m.ret = w.Return
		}
		if len(w.ID) > 0 && !bytes.Equal(w.ID, []byte("null")) {
			id, err := strconv.ParseUint(string(w.ID), 10, 64)
			if err != nil {
				return nil, fmt.Errorf("QMP reply with an id this client never sends (%.40s)", w.ID)
			}
			m.hasID, m.id = true, id
		}
		return m, nil
	default:
		return nil, fmt.Errorf("QMP message %.80q is neither greeting, reply nor event", line)
	}
}
