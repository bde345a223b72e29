package projection

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"

	yaml "go.yaml.in/yaml/v3"
)

// Load reads the projections declared in the YAML file at path. See the
// package documentation for the format. The Specs are not yet checked
// against SQLite; pass them to [CompileAll].
func Load(path string) ([]Spec, error) {
	src, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("projection: %w", err)
	}
	return Parse(path, src)
}

// Parse reads the projections declared in YAML source. file names the source
// in error messages only. Every structural problem is reported, each as an
// [*Error] with its line; on any problem Parse returns no Specs. The Specs
// are in the order of the file. Parse keeps no state between calls.
func Parse(file string, src []byte) ([]Spec, error) {
	dec := yaml.NewDecoder(bytes.NewReader(src))
	var doc yaml.Node
	err := dec.Decode(&doc)
	if errors.Is(err, io.EOF) || err == nil && (len(doc.Content) == 0 || isNull(doc.Content[0])) {
		return nil, &Error{File: file, Line: 1, Problem: "the file declares nothing",
			Fix: "list the projections under a top-level projections: key"}
	}
	if err != nil {
		return nil, syntaxError(file, src, err)
	}
	var more yaml.Node
	switch err := dec.Decode(&more); {
	case err == nil:
		return nil, &Error{File: file, Line: more.Line, Problem: "a second YAML document",
			Fix: "keep every projection in one document, under one projections: key; remove the ---"}
	case !errors.Is(err, io.EOF):
		return nil, syntaxError(file, src, err)
	}

	p := &parser{file: file}
	specs := p.root(doc.Content[0])
	if len(p.errs) > 0 {
		return nil, errors.Join(p.errs...)
	}
	return specs, nil
}

// yamlLine finds the line yaml.v3 puts in its syntax errors.
var yamlLine = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)

// syntaxError turns a yaml.v3 syntax error into an *Error with its line.
func syntaxError(file string, src []byte, err error) error {
	msg := err.Error()
	line := 1
	if m := yamlLine.FindStringSubmatch(msg); m != nil {
		line, _ = strconv.Atoi(m[1])
		msg = m[2]
	} else {
		msg = strings.TrimPrefix(msg, "yaml: ")
		// yaml.v3 leaves the line out when the problem is at the end of
		// the input, which is where an unclosed quote or bracket ends up.
		if strings.Contains(msg, "end of stream") {
			line = bytes.Count(bytes.TrimRight(src, "\n"), []byte("\n")) + 1
		}
	}
	fix := "correct the YAML; write SQL that contains \": \" or \" #\" as a literal block (key: | and the SQL on the lines below)"
	if lines := strings.Split(string(src), "\n"); line >= 1 && line <= len(lines) &&
		strings.HasPrefix(strings.TrimSpace(lines[line-1]), "*") {
		fix = `quote the key for any other event type: "*":`
	}
	return &Error{File: file, Line: line, Problem: "YAML syntax: " + msg, Fix: fix}
}

// parser walks the YAML node tree, which unlike decoding into structs keeps
// the line of every item and lets unknown keys be reported.
type parser struct {
	file string
	errs []error
}

func (p *parser) fail(n *yaml.Node, projection, problem, fix string) {
	p.errs = append(p.errs, &Error{File: p.file, Line: n.Line, Projection: projection, Problem: problem, Fix: fix})
}

func (p *parser) root(root *yaml.Node) []Spec {
	root = deref(root)
	if root.Kind != yaml.MappingNode {
		p.fail(root, "", "the top level is not a mapping", "start the file with projections: and list the projections below it")
		return nil
	}
	var specs []Spec
	p.mapping(root, "", []string{"projections"}, func(key, val *yaml.Node) {
		val = deref(val)
		if !p.collection(val, yaml.SequenceNode, "", "projections is not a list", `start each projection with "- name:"`) {
			return
		}
		for _, item := range val.Content {
			if s, ok := p.projection(deref(item)); ok {
				specs = append(specs, s)
			}
		}
	})
	return specs
}

func (p *parser) projection(n *yaml.Node) (Spec, bool) {
	if n.Kind != yaml.MappingNode {
		p.fail(n, "", "a projection is not a mapping", `start each projection with "- name:" and its other keys below it`)
		return Spec{}, false
	}
	src := &source{file: p.file, item: pos{line: n.Line}, name: pos{line: n.Line},
		on: map[string]pos{}, queries: map[string]pos{}}
	s := Spec{src: src}
	// The name goes into every message about this projection, so find it
	// before the keys that may come ahead of it.
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value == "name" {
			if v := deref(n.Content[i+1]); v.Kind == yaml.ScalarNode {
				s.Name = v.Value
			}
		}
	}
	before := len(p.errs)
	p.mapping(n, s.Name, []string{"name", "tables", "on", "forget", "queries"}, func(key, val *yaml.Node) {
		val = deref(val)
		switch key.Value {
		case "name":
			if v, ok := p.scalar(val, s.Name, "name is not a string", "write name: and a lowercase name such as balances"); ok {
				s.Name, src.name = v, at(val)
			}
		case "tables":
			p.tables(&s, val)
		case "on":
			p.on(&s, val)
		case "forget":
			if v, ok := p.scalar(val, s.Name, "forget is not a string", "write forget: and one DELETE or UPDATE statement"); ok {
				s.Forget, src.forget = v, at(val)
			}
		case "queries":
			p.queries(&s, val)
		}
	})
	return s, len(p.errs) == before
}

func (p *parser) tables(s *Spec, n *yaml.Node) {
	// No tables is for Compile to report, with Go specs alike.
	if !p.collection(n, yaml.SequenceNode, s.Name, "tables is not a list", `write each statement as a "- " item under tables:`) {
		return
	}
	for _, item := range n.Content {
		item = deref(item)
		if v, ok := p.scalar(item, s.Name, "a table is not a string", "write one CREATE statement per item"); ok {
			s.Tables = append(s.Tables, v)
			s.src.tables = append(s.src.tables, at(item))
		}
	}
}

func (p *parser) on(s *Spec, n *yaml.Node) {
	if !p.collection(n, yaml.MappingNode, s.Name, "on is not a mapping", "map each event type to one statement, as Deposited: INSERT ...") {
		return
	}
	s.On = map[string]string{}
	p.mapping(n, s.Name, nil, func(key, val *yaml.Node) {
		val = deref(val)
		if v, ok := p.scalar(val, s.Name, fmt.Sprintf("on %s is not a string", key.Value),
			"map the event type to one SQL statement; use INSERT ... ON CONFLICT DO UPDATE to upsert"); ok {
			s.On[key.Value] = v
			s.src.on[key.Value] = at(val)
		}
	})
}

func (p *parser) queries(s *Spec, n *yaml.Node) {
	if !p.collection(n, yaml.MappingNode, s.Name, "queries is not a mapping", "name each query and give it sql:, as by_account: {sql: SELECT ...}") {
		return
	}
	s.Queries = map[string]Query{}
	p.mapping(n, s.Name, nil, func(key, val *yaml.Node) {
		name := key.Value
		val = deref(val)
		if val.Kind != yaml.MappingNode {
			p.fail(val, s.Name, fmt.Sprintf("query %s is not a mapping", name),
				fmt.Sprintf("put the statement under sql:, as %s: {sql: SELECT ...}", name))
			return
		}
		var q Query
		where := at(key)
		p.mapping(val, s.Name, []string{"sql"}, func(_, v *yaml.Node) {
			v = deref(v)
			if text, ok := p.scalar(v, s.Name, fmt.Sprintf("query %s: sql is not a string", name), "write one SELECT statement"); ok {
				q.SQL, where = text, at(v)
			}
		})
		s.Queries[name] = q
		s.src.queries[name] = where
	})
}

// collection reports whether n is a list or mapping of the given kind to
// walk. A null, a key with nothing after it, is an empty one; any other kind
// is reported.
func (p *parser) collection(n *yaml.Node, kind yaml.Kind, projection, problem, fix string) bool {
	if isNull(n) {
		return false
	}
	if n.Kind != kind {
		p.fail(n, projection, problem, fix)
		return false
	}
	return true
}

// mapping calls f for each entry of n in order. It reports keys that are not
// strings, keys given twice and, when allowed is not nil, keys not in it,
// suggesting the allowed key nearest to a misspelt one.
func (p *parser) mapping(n *yaml.Node, projection string, allowed []string, f func(key, val *yaml.Node)) {
	seen := map[string]int{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		key, val := deref(n.Content[i]), n.Content[i+1]
		if key.Kind != yaml.ScalarNode {
			p.fail(key, projection, "a key is not a string", "use plain names as keys")
			continue
		}
		if first, dup := seen[key.Value]; dup {
			p.fail(key, projection, fmt.Sprintf("%s is given twice", key.Value),
				fmt.Sprintf("keep one of them; the first is on line %d", first))
			continue
		}
		seen[key.Value] = key.Line
		if allowed != nil && !contains(allowed, key.Value) {
			fix := "the keys here are " + strings.Join(allowed, ", ")
			if c := closest(key.Value, allowed); c != "" {
				fix = "did you mean " + c + "?"
			}
			p.fail(key, projection, fmt.Sprintf("unknown key %q", key.Value), fix)
			continue
		}
		f(key, val)
	}
}

// scalar returns the text of a scalar node, reporting anything else. A null
// (a key with nothing after it) is the empty string, which Compile reports
// as a missing statement along with a Spec built in Go.
func (p *parser) scalar(n *yaml.Node, projection, problem, fix string) (string, bool) {
	switch {
	case isNull(n):
		return "", true
	case n.Kind == yaml.ScalarNode:
		return n.Value, true
	}
	p.fail(n, projection, problem, fix)
	return "", false
}

func at(n *yaml.Node) pos { return pos{line: n.Line, literal: n.Style&yaml.LiteralStyle != 0} }

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.Tag == "!!null" && n.Style == 0 && (n.Value == "" || n.Value == "~" || n.Value == "null")
}

// deref follows aliases, so that anchors may share a statement.
func deref(n *yaml.Node) *yaml.Node {
	for n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	return n
}
